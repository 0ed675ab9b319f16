"""Kademlia routing table: k-buckets with ping-before-evict and replacement caches.

Sans-I/O: every method takes ``now`` and returns decisions; the runtime sends
the pings and reports back.

Layout: 256 fixed buckets indexed by :func:`~macula_lab.core.ids.bucket_index`
(255 = farthest half of the id space, 0 = nearest).  With random ids only the
top ~log2(N) buckets ever fill, so fixed buckets cost nothing and avoid the
splitting logic.  Each bucket holds up to ``k`` contacts ordered
least-recently-seen first, plus a replacement cache of contacts seen while the
bucket was full (most recent last).

Liveness rules (Kademlia paper, section 2.2; the reference silently dropped
newcomers when a bucket was full):

* :meth:`RoutingTable.observe` - we heard from a contact.  Known: move to the
  tail.  Room: append.  Full: the newcomer goes to the replacement cache and the
  table returns :class:`PingNeeded` for the bucket's least-recently-seen contact
  (one outstanding ping per bucket), unless that contact was heard from within
  ``fresh_for`` seconds (default 60): it is known to be alive, so the ping would
  only confirm it (BEP 5 calls such contacts "good").  Without this rule every
  request from a stranger to a node with a full bucket cost a ping: 0.28 extra
  round trips per lookup in ``bench/dht.py`` at N=60.  Long-lived contacts are
  preferred because they are the likeliest to stay up; eviction only happens
  after the ping fails.
* :meth:`RoutingTable.ping_result` - alive: the old contact moves to the tail,
  the newcomer waits in the cache.  Dead: evict it and promote the most recent
  replacement.
* :meth:`RoutingTable.failed` - a request to a contact timed out or failed.
  After ``max_failures`` consecutive failures (default 2) it is removed and a
  replacement promoted.  Two, not one: a single lost datagram or a slow reply
  must not evict a good contact, but a dead contact must leave the table quickly
  so that lookups stop choosing it.  Any sign of life resets the count.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidField
from .endpoint import check_endpoint
from .ids import ID_BITS, bucket_index, check_id, hex_short, xor_distance
from .params import check_node_name

DEFAULT_K = 20
DEFAULT_MAX_FAILURES = 2
#: a PingNeeded that got no ping_result within this time may be issued again
DEFAULT_PING_TIMEOUT = 10.0
#: a contact heard from within this time is not pinged to make room for a newcomer
DEFAULT_FRESH_FOR = 60.0
DEFAULT_REFRESH_INTERVAL = 3600.0


@dataclass(frozen=True, slots=True)
class Contact:
    """A node as the DHT knows it: id plus the endpoint string it listens on."""

    node_id: bytes
    endpoint: str
    name: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "endpoint": self.endpoint, "name": self.name}

    @classmethod
    def from_wire(cls, item: Any) -> Contact:
        """Parse one entry of a FIND_NODE reply; raises :class:`InvalidField`.

        A contact already checked is returned from a memo, the same object: every
        reply of a lookup repeats contacts the node (or, in one process, another
        node) has parsed before, and checking the same 20 contacts again and again
        was the largest cost of a join.  Sharing the objects also keeps one copy of
        each contact for all the routing tables of a simulation.
        """
        if not isinstance(item, dict):
            raise InvalidField(f"contact must be a map, got {type(item).__name__}")
        key = (item.get("node_id"), item.get("endpoint"), item.get("name", ""))
        try:
            known = _CHECKED.get(key)
        except TypeError:  # an unhashable field: not a contact we checked; the checks say why
            known = None
        if known is not None and cls is Contact:
            return known
        node_id = check_id(key[0], "contact node_id")
        endpoint = check_endpoint(key[1], "endpoint")
        name = key[2]
        if name:
            check_node_name(name)
        contact = cls(node_id, endpoint, name)
        if cls is Contact:
            if len(_CHECKED) >= _CHECKED_MAX:
                _CHECKED.clear()  # a bound, not an LRU: refilled by the next lookups
            _CHECKED[key] = contact
        return contact

    @property
    def short_id(self) -> str:
        return hex_short(self.node_id)


#: contacts parsed from the wire and checked, by (node_id, endpoint, name): see Contact.from_wire
_CHECKED: dict[tuple[Any, Any, Any], Contact] = {}
_CHECKED_MAX = 100_000


@dataclass(frozen=True, slots=True)
class PingNeeded:
    """Decision: ping ``oldest``; report with :meth:`RoutingTable.ping_result`.

    ``candidate`` is the newcomer waiting in the replacement cache; it takes the
    slot if ``oldest`` does not answer.
    """

    oldest: Contact
    candidate: Contact


@dataclass(slots=True)
class _Entry:
    contact: Contact
    last_seen: float
    failures: int = 0


@dataclass(slots=True)
class _Bucket:
    entries: OrderedDict[bytes, _Entry] = field(default_factory=OrderedDict)  # LRS first
    replacements: OrderedDict[bytes, _Entry] = field(default_factory=OrderedDict)  # newest last
    last_touched: float | None = None  # last lookup into this range (None: never)
    pinging: bytes | None = None  # id of the contact with an outstanding PingNeeded
    ping_sent: float = 0.0
    index: int = 0


class _Buckets:
    """The 256 buckets of a table, each made when first written or touched.

    With random ids only the ~log2(N) farthest buckets ever hold anyone; 256
    buckets of two OrderedDicts each, made up front, were most of a node's
    memory and of its construction time in a 10,000-node simulation.
    Iterating yields a shared empty bucket for the ones never made (read only).
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[_Bucket | None] = [None] * ID_BITS

    def __getitem__(self, index: int) -> _Bucket:
        bucket = self._items[index]
        if bucket is None:
            bucket = self._items[index] = _Bucket(index=index)
        return bucket

    def __iter__(self) -> Iterator[_Bucket]:
        return (_EMPTY if b is None else b for b in self._items)

    def __len__(self) -> int:
        return ID_BITS


_EMPTY = _Bucket(index=-1)


class RoutingTable:
    """The k-bucket table of node ``self_id``."""

    def __init__(
        self,
        self_id: bytes,
        k: int = DEFAULT_K,
        *,
        replacement_size: int | None = None,
        max_failures: int = DEFAULT_MAX_FAILURES,
        ping_timeout: float = DEFAULT_PING_TIMEOUT,
        fresh_for: float = DEFAULT_FRESH_FOR,
    ) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        if max_failures < 1:
            raise ValueError("max_failures must be >= 1")
        self.self_id = check_id(self_id, "self_id")
        self.k = k
        self.replacement_size = k if replacement_size is None else replacement_size
        self.max_failures = max_failures
        self.ping_timeout = ping_timeout
        self.fresh_for = fresh_for
        self._buckets = _Buckets()
        self._count = 0
        self._occupied: list[
            int
        ] = []  # indices of non-empty buckets, ascending (closest() visits only these)

    # ------------------------------------------------------------ liveness
    def observe(self, contact: Contact, now: float) -> PingNeeded | None:
        """Record that ``contact`` is alive (it sent us a request or a reply)."""
        check_id(contact.node_id, "contact node_id")
        if contact.node_id == self.self_id:
            return None
        bucket = self._bucket_of(contact.node_id)
        entry = bucket.entries.get(contact.node_id)
        if entry is not None:
            self._refresh(bucket, entry, contact, now)
            return None
        if len(bucket.entries) < self.k:
            bucket.replacements.pop(contact.node_id, None)
            self._add(bucket, _Entry(contact, now))
            return None
        self._add_replacement(bucket, _Entry(contact, now))
        return self._ping_decision(bucket, contact, now)

    def ping_result(self, contact_id: bytes, alive: bool, now: float) -> None:
        """Report the outcome of a ping asked for by :class:`PingNeeded`."""
        if contact_id == self.self_id:
            return
        bucket = self._bucket_of(contact_id)
        if bucket.pinging == contact_id:
            bucket.pinging = None
        entry = bucket.entries.get(contact_id)
        if entry is None:
            return
        if alive:
            self._refresh(bucket, entry, entry.contact, now)
        else:
            self._evict(bucket, contact_id)

    def failed(self, contact_id: bytes, now: float) -> bool:
        """A request to ``contact_id`` failed; returns True if it was removed."""
        if contact_id == self.self_id:
            return False
        bucket = self._bucket_of(contact_id)
        spare = bucket.replacements.get(contact_id)
        if spare is not None:
            # a waiting replacement that fails is not worth promoting later
            del bucket.replacements[contact_id]
            return False
        entry = bucket.entries.get(contact_id)
        if entry is None:
            return False
        entry.failures += 1
        if entry.failures < self.max_failures:
            return False
        self._evict(bucket, contact_id)
        return True

    def remove(self, node_id: bytes) -> bool:
        """Forget a contact (and promote a replacement); True if it was in a bucket."""
        if node_id == self.self_id:
            return False
        bucket = self._bucket_of(node_id)
        bucket.replacements.pop(node_id, None)
        if node_id not in bucket.entries:
            return False
        self._evict(bucket, node_id)
        return True

    # ------------------------------------------------------------- queries
    def closest(self, target: bytes, n: int | None = None, exclude: Iterable[bytes] = ()) -> list[Contact]:
        """The ``n`` (default k) known contacts closest to ``target``, nearest first.

        Exact, without sorting the whole table: with ``d = target ^ self_id`` and
        ``b = bit_length(d) - 1``, contacts of bucket ``b`` are within ``2**b`` of
        the target, those of all buckets below ``b`` lie in ``[2**b, 2**(b+1))``,
        and bucket ``i > b`` lies in ``[2**i, 2**(i+1))``.  So visit bucket b,
        then the buckets below it together, then b+1, b+2 ... and stop once n are
        collected.
        """
        n = self.k if n is None else n
        if n <= 0:
            return []
        skip = set(exclude)
        b = xor_distance(target, self.self_id).bit_length() - 1  # -1 when target == self
        t = int.from_bytes(target, "big")
        from_bytes = int.from_bytes
        out: list[Contact] = []

        def take(indices: Iterable[int]) -> None:
            group = [
                e.contact for i in indices for nid, e in self._buckets[i].entries.items() if nid not in skip
            ]
            # the target's int once, not once per comparison key (the hottest line of a lookup)
            group.sort(key=lambda c: from_bytes(c.node_id, "big") ^ t)
            out.extend(group)

        occupied = self._occupied
        split = bisect.bisect_left(occupied, b) if b >= 0 else 0
        if split < len(occupied) and occupied[split] == b:
            take((b,))
            split_above = split + 1
        else:
            split_above = split
        if len(out) < n and split:
            take(occupied[:split])  # every bucket below b, together
        for i in occupied[split_above:]:
            if len(out) >= n:
                break
            take((i,))
        return out[:n]

    def get(self, node_id: bytes) -> Contact | None:
        if node_id == self.self_id:
            return None
        entry = self._bucket_of(node_id).entries.get(node_id)
        return entry.contact if entry else None

    def __contains__(self, node_id: object) -> bool:
        return (
            isinstance(node_id, bytes) and len(node_id) == len(self.self_id) and self.get(node_id) is not None
        )

    def __len__(self) -> int:
        return self._count

    def contacts(self) -> list[Contact]:
        """Every contact in the buckets (not the replacement caches), nearest bucket first."""
        return [e.contact for b in self._buckets for e in b.entries.values()]

    def bucket_contacts(self, index: int) -> list[Contact]:
        """Contacts of one bucket, least-recently-seen first."""
        return [e.contact for e in self._buckets[index].entries.values()]

    def replacements(self, index: int) -> list[Contact]:
        """Replacement cache of one bucket, most recent last."""
        return [e.contact for e in self._buckets[index].replacements.values()]

    # ------------------------------------------------------------- refresh
    def touch_bucket(self, index: int, now: float) -> None:
        """Note a lookup into bucket ``index``'s range (call with bucket_index(self_id, target))."""
        self._buckets[index].last_touched = now

    def buckets_needing_refresh(self, now: float, interval: float = DEFAULT_REFRESH_INTERVAL) -> list[int]:
        """Bucket indices not touched by a lookup within ``interval``.

        Only buckets from the nearest non-empty one up to 255 count (the paper's
        "all buckets further away than the closest neighbour"): nearer buckets
        cover ranges so small that they are almost surely empty in the network
        too.  An empty table returns [] (bootstrap first).  Refresh bucket ``i``
        with a lookup of ``random_id_in_bucket(self_id, i)``.
        """
        nearest = next((i for i, b in enumerate(self._buckets) if b.entries), None)
        if nearest is None:
            return []
        return [
            i
            for i, b in enumerate(self._buckets)
            if i >= nearest and (b.last_touched is None or now - b.last_touched >= interval)
        ]

    # ---------------------------------------------------------------- views
    def snapshot(self, now: float | None = None, *, replacements: bool = False) -> list[dict[str, Any]]:
        """Rows for the lab views, nearest bucket first (``age`` needs ``now``)."""
        rows = []
        for index, bucket in enumerate(self._buckets):
            groups = [(False, bucket.entries)]
            if replacements:
                groups.append((True, bucket.replacements))
            for is_spare, entries in groups:
                for e in entries.values():
                    rows.append(
                        {
                            "bucket": index,
                            "node_id": e.contact.node_id.hex(),
                            "name": e.contact.name,
                            "endpoint": e.contact.endpoint,
                            "last_seen": e.last_seen,
                            "age": None if now is None else now - e.last_seen,
                            "failures": e.failures,
                            "replacement": is_spare,
                        }
                    )
        return rows

    def bucket_sizes(self) -> dict[int, int]:
        """Non-empty buckets: index -> number of contacts."""
        return {i: len(b.entries) for i, b in enumerate(self._buckets) if b.entries}

    # ------------------------------------------------------------ internals
    def _bucket_of(self, node_id: bytes) -> _Bucket:
        return self._buckets[bucket_index(self.self_id, node_id)]

    def _add(self, bucket: _Bucket, entry: _Entry) -> None:
        bucket.entries[entry.contact.node_id] = entry
        self._count += 1
        if len(bucket.entries) == 1:
            bisect.insort(self._occupied, bucket.index)

    def _refresh(self, bucket: _Bucket, entry: _Entry, contact: Contact, now: float) -> None:
        entry.contact = contact  # the endpoint may have changed (restart on a new port)
        entry.last_seen = now
        entry.failures = 0
        bucket.entries.move_to_end(contact.node_id)
        if bucket.pinging == contact.node_id:
            bucket.pinging = None  # it just proved alive: the pending ping is moot

    def _add_replacement(self, bucket: _Bucket, entry: _Entry) -> None:
        if self.replacement_size <= 0:
            return
        bucket.replacements.pop(entry.contact.node_id, None)
        bucket.replacements[entry.contact.node_id] = entry
        while len(bucket.replacements) > self.replacement_size:
            bucket.replacements.popitem(last=False)  # drop the stalest newcomer

    def _ping_decision(self, bucket: _Bucket, candidate: Contact, now: float) -> PingNeeded | None:
        # one outstanding ping per bucket, re-issued only if the driver never answered
        if bucket.pinging is not None and now - bucket.ping_sent < self.ping_timeout:
            return None
        entry = next(iter(bucket.entries.values()))
        if now - entry.last_seen < self.fresh_for:
            return None  # heard from lately (and the others more lately still): alive
        oldest = entry.contact
        bucket.pinging = oldest.node_id
        bucket.ping_sent = now
        return PingNeeded(oldest, candidate)

    def _evict(self, bucket: _Bucket, node_id: bytes) -> None:
        del bucket.entries[node_id]
        self._count -= 1
        if not bucket.entries:
            self._occupied.remove(bucket.index)
        if bucket.pinging == node_id:
            bucket.pinging = None
        if bucket.replacements:
            _, spare = bucket.replacements.popitem(last=True)  # most recently seen
            spare.failures = 0
            self._add(bucket, spare)
