"""Provider records: the values the DHT stores, with per-provider merge and expiry.

A DHT key (see :func:`~macula_lab.core.ids.service_key`) maps to a *set* of
provider entries keyed by the provider's node id.  The reference's wire STORE
replaced the whole value (last provider wins) and never enforced the TTL; here:

* **Merge per provider.**  A STORE touches only its provider's entry.  For one
  provider the higher ``seq`` wins (content and expiry replaced, even if the new
  TTL is shorter).  An equal ``seq`` is the same advertisement delivered again
  (replication, handover): the content is kept and the expiry extended to the
  later of the two.  A lower ``seq`` is stale and refused.  Providers should use
  a seq that survives restarts (e.g. milliseconds since the epoch).
* **Expiry.**  Every storing node drops an entry at ``now + ttl``; :meth:`get`
  never returns an expired entry even before :meth:`expire` runs.  A TTL above
  24 h (:data:`~.params.MAX_TTL`) is refused, never clamped: a peer cannot pin
  an entry forever, and a provider never sees its record lapse before it
  republishes.
* **Authority.**  ``store`` is told who sent the entry (``source``, the
  authenticated session peer; None for this node itself).  The provider's own
  STORE (source equal to the provider) is authoritative: it replaces a copy
  whatever the copy's seq.  A *copy* from another node (replication, handover)
  only fills a gap: it is stored when this node holds nothing live for that
  provider, and may later only extend the very same advertisement (same seq
  and content); it never replaces an entry, so no peer can lock a provider out
  with a huge seq or repoint its record.  The driver honours REMOVE only from
  the provider itself.
* **Removal.**  :meth:`RecordStore.remove` leaves a tombstone holding the removed
  entry's seq until that entry would have expired, so a replica that missed the
  REMOVE cannot resurrect it by handing it over again; a fresh advertisement
  (higher seq) is accepted at once.
* **Limits** (a peer must not exhaust memory): at most ``max_keys`` keys,
  ``max_providers`` providers per key, ``max_per_source`` entries stored by
  any one peer and ``max_copies_per_key`` copies from one peer under one key.  When full, expired entries are purged first; then a provider's
  own STORE may evict a copy (from the peer holding the most), but nothing
  evicts a provider's own entry: a flood cannot push out live providers, and
  cannot keep a genuine new provider out.  Refusals are counted in :meth:`stats`.

Handing over: when a node learns of a new node, :func:`keys_to_hand_over` names
the keys the newcomer is now responsible for, and the driver STOREs them with
``entry.to_wire(now)`` (remaining TTL, so a record never outlives its origin).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..errors import InvalidField
from .endpoint import check_endpoint
from .ids import ID_BYTES, check_id, xor_distance
from .params import DEFAULT_TTL, MAX_TTL, check_metadata, check_seconds

if TYPE_CHECKING:
    from .routing import Contact, RoutingTable

MAX_SEQ = (1 << 64) - 1
DEFAULT_MAX_KEYS = 10_000
DEFAULT_MAX_PROVIDERS = 100
DEFAULT_MAX_PER_SOURCE = 1_000  # entries one peer can make a node hold (its own and its copies)
#: copies one peer may add under one key: a rogue certificate holder cannot fill a service's
#: provider list with made-up providers (a handover of a busier key completes as providers republish)
DEFAULT_MAX_COPIES_PER_KEY = 16


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    """One provider of a service, as advertised (and, once stored, with its expiry)."""

    node_id: bytes
    endpoint: str
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)
    ttl: float = DEFAULT_TTL
    seq: int = 0
    expires_at: float | None = None  # set by the storing node
    #: who stored it here (set by the storing node): the provider itself, or the peer that copied it
    source: bytes | None = field(default=None, compare=False)

    @property
    def by_owner(self) -> bool:
        """Stored by the provider itself (or not stored: an advertisement)."""
        return self.source is None or self.source == self.node_id

    def to_wire(self, now: float | None = None) -> dict[str, Any]:
        """The STORE value.  With ``now`` (and an expiry), ttl is the remaining time."""
        ttl = self.ttl
        if now is not None and self.expires_at is not None:
            ttl = max(0.0, self.expires_at - now)
        return {
            "node_id": self.node_id,
            "endpoint": self.endpoint,
            "metadata": self.metadata,
            "ttl": ttl,
            "seq": self.seq,
        }

    @classmethod
    def from_wire(cls, d: Any) -> ProviderEntry:
        """Validate a peer's value; raises :class:`InvalidField` naming the problem.

        The TTL is what is left of the record's life (a handover carries the
        remaining time), so anything in (0, 24 h] is accepted; more is refused.
        """
        if not isinstance(d, dict):
            raise InvalidField(f"provider entry must be a map, got {type(d).__name__}", field="value")
        node_id = check_id(d.get("node_id"), "provider node_id")
        endpoint = check_endpoint(d.get("endpoint"), "endpoint")
        metadata = check_metadata(d.get("metadata", {}))
        ttl = check_seconds(d.get("ttl"), "ttl", low=0.0, high=MAX_TTL, low_open=True)
        seq = d.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
            raise InvalidField(f"provider seq must be an integer in 0..2**64-1, got {seq!r}", field="seq")
        return cls(node_id, endpoint, metadata, ttl, seq)

    def remaining(self, now: float) -> float:
        """Seconds left before expiry (inf if not stored)."""
        return math.inf if self.expires_at is None else self.expires_at - now

    def live(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True, slots=True)
class _Tombstone:
    seq: int
    until: float


class RecordStore:
    """key (32 bytes) -> {provider node id -> ProviderEntry}, with expiry."""

    def __init__(
        self,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        max_providers: int = DEFAULT_MAX_PROVIDERS,
        max_per_source: int = DEFAULT_MAX_PER_SOURCE,
        max_copies_per_key: int = DEFAULT_MAX_COPIES_PER_KEY,
    ) -> None:
        self.max_keys = max_keys
        self.max_providers = max_providers
        self.max_per_source = max_per_source
        self.max_copies_per_key = max_copies_per_key
        self._data: dict[bytes, dict[bytes, ProviderEntry]] = {}
        self._tombstones: dict[tuple[bytes, bytes], _Tombstone] = {}
        # (expires_at, key, provider): lazy heap, stale items skipped when popped
        self._heap: list[tuple[float, bytes, bytes]] = []
        self._per_source: dict[bytes, int] = {}  # who stored them -> entries held (None: this node)
        self._refused_stale = 0
        self._refused_full = 0
        self._refused_not_owner = 0
        self._refused_quota = 0
        self._evicted_copies = 0
        #: told of every change of a key's provider set: ``(kind, key, entry)`` with kind
        #: "stored" (a new provider or a new advertisement of one), "removed" or "expired"
        #: (watches learn of changes on this replica here; a re-store that only extends is no change)
        self.listener: Callable[[str, bytes, ProviderEntry], None] | None = None

    # ------------------------------------------------------------- writes
    def store(self, key: bytes, entry: ProviderEntry, now: float, *, source: bytes | None = None) -> bool:
        """Merge ``entry`` under ``key``, sent by ``source`` (None: this node); True if accepted.

        See the module docstring for who may change what.
        """
        check_id(key, "key")
        if not 0 < entry.ttl <= MAX_TTL:  # entries are checked where they enter (from_wire, services)
            raise InvalidField(f"ttl must be in (0, {MAX_TTL:g}] seconds, got {entry.ttl!r}", field="ttl")
        entry = replace(entry, expires_at=now + entry.ttl, source=None if source == entry.node_id else source)
        owner = entry.by_owner
        providers = self._data.get(key)
        current = providers.get(entry.node_id) if providers else None
        if current is not None and current.live(now):
            if owner and not current.by_owner:  # the provider itself overrides any copy
                self._put(key, entry)
                return True
            if not owner and (entry.seq != current.seq or not _same_content(entry, current)):
                self._refused_not_owner += 1  # a copy never changes an entry, whatever its seq
                return False
            return self._merge(key, current, entry)
        tomb = self._tombstones.get((key, entry.node_id))
        if tomb is not None and tomb.until > now and entry.seq <= tomb.seq:
            self._refused_stale += 1
            return False
        if entry.source is not None and (
            self._per_source.get(entry.source, 0) >= self.max_per_source
            or (
                providers
                and sum(1 for e in providers.values() if e.source == entry.source) >= self.max_copies_per_key
            )
        ):
            self._refused_quota += 1
            return False
        if current is None and not self._has_room(key, now, for_owner=owner):
            self._refused_full += 1
            return False
        self._tombstones.pop((key, entry.node_id), None)
        self._put(key, entry)
        return True

    def remove(self, key: bytes, provider_id: bytes, now: float | None = None) -> bool:
        """Delete one provider's entry; True if it was there (and live, given ``now``)."""
        entry = self._drop(key, provider_id)
        if entry is None:
            return False
        if entry.expires_at is not None:
            self._tombstones[(key, provider_id)] = _Tombstone(entry.seq, entry.expires_at)
        live = now is None or entry.live(now)
        if live:
            self._notify("removed", key, entry)
        return live

    def expire(self, now: float) -> list[tuple[bytes, bytes]]:
        """Drop every entry whose time has come; returns the (key, provider) pairs removed."""
        removed = []
        while self._heap and self._heap[0][0] <= now:
            expires_at, key, provider = heapq.heappop(self._heap)
            entry = self._data.get(key, {}).get(provider)
            if entry is None or entry.expires_at != expires_at:
                continue  # superseded by a later store or removed
            self._drop(key, provider)
            removed.append((key, provider))
            self._notify("expired", key, entry)
        for pair in [p for p, t in self._tombstones.items() if t.until <= now]:
            del self._tombstones[pair]
        return removed

    # -------------------------------------------------------------- reads
    def get(self, key: bytes, now: float) -> list[ProviderEntry]:
        """Live entries under ``key``, in first-stored order."""
        return [e for e in self._data.get(key, {}).values() if e.live(now)]

    def removed(self, key: bytes, now: float) -> list[tuple[bytes, int]]:
        """(provider, seq) of the advertisements removed under ``key`` whose tombstones still stand."""
        return [(p, t.seq) for (k, p), t in self._tombstones.items() if k == key and t.until > now]

    def next_expiry(self) -> float | None:
        """When the next entry expires (for the driver's timer), or None."""
        while self._heap:
            expires_at, key, provider = self._heap[0]
            entry = self._data.get(key, {}).get(provider)
            if entry is not None and entry.expires_at == expires_at:
                return expires_at
            heapq.heappop(self._heap)
        return None

    def keys(self) -> list[bytes]:
        return list(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def provider_count(self) -> int:
        return sum(len(p) for p in self._data.values())

    def entries(self) -> list[tuple[bytes, ProviderEntry]]:
        """Every stored (key, entry), expired-but-not-purged included (for handover use get)."""
        return [(key, e) for key, providers in self._data.items() for e in providers.values()]

    def stats(self) -> dict[str, int]:
        return {
            "keys": len(self._data),
            "providers": self.provider_count(),
            "tombstones": len(self._tombstones),
            "refused_stale": self._refused_stale,
            "refused_full": self._refused_full,
            "refused_not_owner": self._refused_not_owner,
            "refused_quota": self._refused_quota,
            "evicted_copies": self._evicted_copies,
            "sources": len(self._per_source),
        }

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Rows for the lab views: one per live entry, with its remaining TTL."""
        return [
            {
                "key": key.hex(),
                "provider": e.node_id.hex(),
                "endpoint": e.endpoint,
                "metadata": e.metadata,
                "seq": e.seq,
                "ttl": e.ttl,
                "remaining": e.remaining(now),
                "by_owner": e.by_owner,
            }
            for key, providers in self._data.items()
            for e in providers.values()
            if e.live(now)
        ]

    # ---------------------------------------------------------- internals
    def _merge(self, key: bytes, current: ProviderEntry, entry: ProviderEntry) -> bool:
        """The same provider again: a higher seq replaces, the same seq extends, a lower one is stale."""
        if entry.seq < current.seq:
            self._refused_stale += 1
            return False
        if entry.seq == current.seq:
            if current.expires_at is not None and entry.expires_at <= current.expires_at:
                return True  # nothing new, already stored
            self._put(key, replace(current, expires_at=entry.expires_at))
            return True
        self._put(key, entry)
        return True

    def _put(self, key: bytes, entry: ProviderEntry) -> None:
        providers = self._data.setdefault(key, {})
        old = providers.get(entry.node_id)
        if old is not None:
            self._count(old.source, -1)
        providers[entry.node_id] = entry
        self._count(entry.source, +1)
        assert entry.expires_at is not None
        heapq.heappush(self._heap, (entry.expires_at, key, entry.node_id))
        if old is None or old.seq != entry.seq or not _same_content(old, entry):
            self._notify("stored", key, entry)

    def _notify(self, kind: str, key: bytes, entry: ProviderEntry) -> None:
        if self.listener is not None:
            self.listener(kind, key, entry)

    def _drop(self, key: bytes, provider: bytes) -> ProviderEntry | None:
        providers = self._data.get(key)
        entry = providers.pop(provider, None) if providers else None
        if entry is None:
            return None
        if not providers:
            del self._data[key]
        self._count(entry.source, -1)
        return entry

    def _count(self, source: bytes | None, delta: int) -> None:
        if source is None:
            return
        n = self._per_source.get(source, 0) + delta
        if n > 0:
            self._per_source[source] = n
        else:
            self._per_source.pop(source, None)

    def _has_room(self, key: bytes, now: float, *, for_owner: bool) -> bool:
        providers = self._data.get(key)
        full = len(self._data) >= self.max_keys if providers is None else len(providers) >= self.max_providers
        if not full:
            return True
        self.expire(now)
        providers = self._data.get(key)
        full = len(self._data) >= self.max_keys if providers is None else len(providers) >= self.max_providers
        if not full:
            return True
        # a provider's own STORE may take the place of a copy; nothing takes an owner's place
        return for_owner and self._evict_copy(key if providers is not None else None)

    def _evict_copy(self, key: bytes | None) -> bool:
        """Drop one copy (under ``key``, or anywhere), from the peer that holds the most."""
        rows = self._data.get(key, {}).values() if key is not None else (
            e for providers in self._data.values() for e in providers.values()
        )
        copies = [e for e in rows if not e.by_owner]
        if not copies:
            return False
        victim = max(copies, key=lambda e: (self._per_source.get(e.source, 0), -(e.expires_at or 0)))
        for k, providers in self._data.items():
            if providers.get(victim.node_id) is victim:
                self._drop(k, victim.node_id)
                self._evicted_copies += 1
                return True
        return False


def _same_content(a: ProviderEntry, b: ProviderEntry) -> bool:
    return a.endpoint == b.endpoint and a.metadata == b.metadata


HANDOVER_SENDERS = 3


def keys_to_hand_over(
    keys: Iterable[bytes],
    new_contact: Contact,
    table: RoutingTable,
    k: int | None = None,
    *,
    senders: int | None = HANDOVER_SENDERS,
) -> list[bytes]:
    """Keys that ``new_contact`` should now store, per ``table``'s view.

    A key qualifies when the newcomer is among the k closest of the nodes we know
    (our contacts, ourselves and the newcomer).  We also require that we are
    among the ``senders`` closest of the nodes we know besides the newcomer, so
    that a few replicas - not all k - send the STORE.  bmuller's kademlia uses one
    sender (the closest); but when nodes join at the same time the closest may be
    another newcomer that has not received the record yet, and the key would miss
    this newcomer until the provider re-advertises (minutes).  Three senders cover
    two concurrent joins for three STOREs.  ``senders=None``: every replica sends.
    """
    k = table.k if k is None else k
    self_id = table.self_id
    new_id = new_contact.node_id
    out = []
    for key in keys:
        if len(key) != ID_BYTES:
            continue
        others = table.closest(key, max(k, senders or 0), exclude=(new_id,))
        self_distance = xor_distance(self_id, key)
        # the k-th closest of {self} + others: the newcomer must beat it
        ranked = sorted([xor_distance(c.node_id, key) for c in others] + [self_distance])
        if len(ranked) >= k and xor_distance(new_id, key) >= ranked[k - 1]:
            continue
        if senders is not None and ranked.index(self_distance) >= senders:
            continue
        out.append(key)
    return out
