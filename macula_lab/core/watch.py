"""Watches, sans-I/O: a service's provider set as a stream of changes, and who subscribed where.

:class:`ProviderSet` is what a watching node knows of one service: the live
providers, tombstones of the ones that left, and a bounded history of the
changes it yielded, each with an index.  It is fed observations from any
source, in any order and any number of times -- a replica's push, this node's
own replica, a reconciliation read -- and turns them into events only when
the set changes:

* a provider not present (and not gone at this seq or later) is ``added``;
* the same provider with a higher seq and other content is ``updated`` (a
  re-advertisement with the same content is no change: every publication
  bumps the seq);
* a provider whose removal or expiry is reported for its current seq (or a
  later one) is ``removed`` / ``expired``; its seq is kept as a tombstone so
  a late copy of that advertisement (a slow replica, a read that started
  before the push) cannot bring it back.

So a change seen from three replicas and a read is yielded once: the
deduplication is by (provider, seq) through that state.  Indexes start at a
time-based base (microseconds) and grow by one per event, so the indexes of a
set built later on the same node are all larger than those of an earlier one:
``since`` an index of another instance is never mistaken for one of this.

:class:`SubscriberTable` is the replica's side: which peers asked to be told of
changes under which key, each a lease that ends unless renewed, bounded per
peer and in total so that a peer can make a node hold only so much.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidField, QuotaExceeded
from .params import MAX_WATCH_LEASE
from .records import ProviderEntry

KINDS = ("added", "updated", "removed", "expired", "reset")
#: events a watching node keeps per service for resuming (``since``)
DEFAULT_HISTORY = 1024
#: tombstones kept per service (a provider id each; the oldest go first)
MAX_TOMBSTONES = 4096
#: an entry missing from a read within this long of its known expiry has expired, not been removed
EXPIRY_SLACK = 1.0

# replica side
DEFAULT_MAX_WATCHES_PER_PEER = 32
DEFAULT_MAX_WATCHES = 2048
MAX_LEASE = MAX_WATCH_LEASE
MIN_LEASE = 1.0


@dataclass(frozen=True, slots=True)
class Provider:
    """One provider as a watch reports it."""

    node_id: str  # hex
    name: str  # metadata "name" (or "client" for a relayed one), else a short id
    endpoint: str
    seq: int
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_entry(cls, entry: ProviderEntry) -> Provider:
        meta = entry.metadata or {}
        name = meta.get("name") or meta.get("node") or meta.get("client") or entry.node_id.hex()[:8]
        return cls(entry.node_id.hex(), str(name), entry.endpoint, entry.seq, dict(meta))

    def to_wire(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "name": self.name,
            "endpoint": self.endpoint,
            "seq": self.seq,
            "metadata": self.metadata,
        }

    @classmethod
    def from_wire(cls, d: Any) -> Provider:
        if not isinstance(d, dict):
            raise InvalidField("provider must be a map", field="provider")
        try:
            return cls(str(d["node_id"]), str(d["name"]), str(d["endpoint"]), int(d["seq"]), dict(d["metadata"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidField(f"provider: {exc}", field="provider") from None


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change of a service's provider set (``reset``: the whole set, in ``providers``)."""

    index: int
    kind: str
    service: str
    provider: Provider | None = None
    providers: tuple[Provider, ...] = ()
    at: float = 0.0  # wall clock when the watching node learned it

    def to_wire(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "service": self.service,
            "provider": None if self.provider is None else self.provider.to_wire(),
            "providers": [p.to_wire() for p in self.providers],
            "at": self.at,
        }

    @classmethod
    def from_wire(cls, d: Any) -> WatchEvent:
        if not isinstance(d, dict) or d.get("kind") not in KINDS:
            raise InvalidField("watch event: not a map with a known kind", field="events")
        index = d.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise InvalidField("watch event: index must be a non-negative integer", field="index")
        provider = d.get("provider")
        providers = d.get("providers") or []
        if not isinstance(providers, list):
            raise InvalidField("watch event: providers must be a list", field="providers")
        at = d.get("at", 0.0)
        return cls(
            index,
            d["kind"],
            str(d.get("service", "")),
            None if provider is None else Provider.from_wire(provider),
            tuple(Provider.from_wire(p) for p in providers),
            float(at) if isinstance(at, int | float) else 0.0,
        )


def index_base() -> int:
    """Where a new provider set's indexes start: microseconds since the epoch (see the module docstring)."""
    return time.time_ns() // 1000


class ProviderSet:
    """One service's providers as a watching node knows them, with a history of changes."""

    def __init__(self, service: str, *, base: int | None = None, history: int = DEFAULT_HISTORY):
        self.service = service
        self.index = index_base() if base is None else base
        self.base = self.index  # since=base replays the whole history while nothing fell out of it
        self.history: deque[WatchEvent] = deque(maxlen=history)
        self.present: dict[bytes, ProviderEntry] = {}
        self._seen_at: dict[bytes, float] = {}  # provider -> when last observed present (loop clock)
        self.gone: OrderedDict[bytes, int] = OrderedDict()  # provider -> seq of the advertisement that left

    # ------------------------------------------------------------ observe
    def observe(self, entry: ProviderEntry, now: float) -> WatchEvent | None:
        """``entry`` is live (``expires_at`` on the loop clock); the event it makes, if any."""
        self._seen_at[entry.node_id] = now
        current = self.present.get(entry.node_id)
        if current is not None:
            if entry.seq < current.seq:
                return None
            self.present[entry.node_id] = entry if entry.seq > current.seq or _later(entry, current) else current
            if entry.seq > current.seq and (entry.endpoint, entry.metadata) != (current.endpoint, current.metadata):
                return self._emit("updated", entry)
            return None
        left = self.gone.get(entry.node_id)
        if left is not None and entry.seq <= left:
            return None  # a late copy of an advertisement that already left
        self.gone.pop(entry.node_id, None)
        self.present[entry.node_id] = entry
        return self._emit("added", entry)

    def left(self, node_id: bytes, seq: int, kind: str) -> WatchEvent | None:
        """A replica reports provider ``node_id``'s advertisement ``seq`` removed or expired."""
        if kind not in ("removed", "expired"):
            raise ValueError(kind)
        current = self.present.get(node_id)
        self._tombstone(node_id, seq)
        if current is None or seq < current.seq:
            return None  # not present, or an older advertisement than the one we hold
        del self.present[node_id]
        self._seen_at.pop(node_id, None)
        return self._emit(kind, current)

    def reconcile(
        self,
        entries: Iterable[ProviderEntry],
        started: float,
        now: float,
        *,
        removed: Mapping[bytes, int] | None = None,
        complete: bool = True,
    ) -> list[WatchEvent]:
        """A read that started at ``started`` found ``entries``: what changed.

        ``removed``: provider -> the highest seq a replica saw removed (its
        tombstones).  A read merges replicas by union, and one that missed a
        REMOVE still holds the entry: the others' tombstones take it out.
        A provider missing from the read has left only if the read is
        ``complete`` (a replica answered) and nothing showed it present since
        the read started (a push can overtake a read).
        """
        events = []
        for node_id, seq in (removed or {}).items():
            ev = self.left(node_id, seq, "removed")
            if ev is not None:
                events.append(ev)
        gone = removed or {}
        entries = [e for e in entries if e.seq > gone.get(e.node_id, -1)]
        found = set()
        for entry in entries:
            found.add(entry.node_id)
            ev = self.observe(entry, now)
            if ev is not None:
                events.append(ev)
        for node_id, entry in list(self.present.items()) if complete else ():
            if node_id in found or self._seen_at.get(node_id, -1.0) > started:
                continue
            expired = entry.expires_at is not None and entry.expires_at <= now + EXPIRY_SLACK
            ev = self.left(node_id, entry.seq, "expired" if expired else "removed")
            if ev is not None:
                events.append(ev)
        return events

    # --------------------------------------------------------------- read
    def providers(self) -> tuple[Provider, ...]:
        return tuple(Provider.from_entry(e) for e in self.present.values())

    def since(self, index: int) -> list[WatchEvent] | None:
        """The events after ``index``; None when they are not all held (the watcher needs a reset)."""
        if index == self.index:
            return []
        if index > self.index or index < self.base:
            return None
        oldest = self.history[0].index if self.history else self.index + 1
        if index + 1 < oldest:
            return None  # some fell out of the history
        return [e for e in self.history if e.index > index]

    def reset(self) -> WatchEvent:
        """The whole set now, at the current index (what a new or lost watcher starts from)."""
        return WatchEvent(self.index, "reset", self.service, None, self.providers(), time.time())

    # ---------------------------------------------------------- internals
    def _emit(self, kind: str, entry: ProviderEntry) -> WatchEvent:
        self.index += 1
        ev = WatchEvent(self.index, kind, self.service, Provider.from_entry(entry), (), time.time())
        self.history.append(ev)
        return ev

    def _tombstone(self, node_id: bytes, seq: int) -> None:
        self.gone[node_id] = max(seq, self.gone.pop(node_id, seq))
        while len(self.gone) > MAX_TOMBSTONES:
            self.gone.popitem(last=False)


def _later(a: ProviderEntry, b: ProviderEntry) -> bool:
    return (a.expires_at or 0.0) > (b.expires_at or 0.0)


@dataclass(slots=True)
class Subscriber:
    node_id: bytes
    endpoint: str
    until: float  # lease end, loop clock


class SubscriberTable:
    """key -> peers to tell of changes there (a replica's watch subscriptions), bounded.

    A peer holds at most ``max_per_peer`` subscriptions, the node at most
    ``max_total``; each is a lease of at most ``MAX_LEASE`` seconds that ends
    unless renewed, so a subscriber that died or a peer that subscribed and
    left costs nothing for long.  When full, expired leases are purged first;
    then the subscription is refused (:class:`QuotaExceeded`).
    """

    def __init__(self, *, max_per_peer: int = DEFAULT_MAX_WATCHES_PER_PEER, max_total: int = DEFAULT_MAX_WATCHES):
        self.max_per_peer = max_per_peer
        self.max_total = max_total
        self._by_key: dict[bytes, dict[bytes, Subscriber]] = {}
        self._per_peer: dict[bytes, int] = {}
        self._total = 0
        self.refused = 0

    def __len__(self) -> int:
        return self._total

    def subscribe(self, key: bytes, node_id: bytes, endpoint: str, lease: float, now: float) -> float:
        """Add or renew ``node_id``'s subscription under ``key``; returns the lease granted (seconds)."""
        lease = min(max(lease, MIN_LEASE), MAX_LEASE)
        subs = self._by_key.get(key)
        current = subs.get(node_id) if subs else None
        if current is not None:
            current.until, current.endpoint = now + lease, endpoint
            return lease
        if self._per_peer.get(node_id, 0) >= self.max_per_peer or self._total >= self.max_total:
            self.expire(now)
        if self._per_peer.get(node_id, 0) >= self.max_per_peer:
            self.refused += 1
            raise QuotaExceeded(f"a peer may hold at most {self.max_per_peer} watches on a node")
        if self._total >= self.max_total:
            self.refused += 1
            raise QuotaExceeded(f"this node holds its maximum of {self.max_total} watches")
        self._by_key.setdefault(key, {})[node_id] = Subscriber(node_id, endpoint, now + lease)
        self._per_peer[node_id] = self._per_peer.get(node_id, 0) + 1
        self._total += 1
        return lease

    def unsubscribe(self, key: bytes, node_id: bytes) -> bool:
        subs = self._by_key.get(key)
        if not subs or node_id not in subs:
            return False
        del subs[node_id]
        if not subs:
            del self._by_key[key]
        n = self._per_peer[node_id] - 1
        if n:
            self._per_peer[node_id] = n
        else:
            del self._per_peer[node_id]
        self._total -= 1
        return True

    def drop_peer(self, node_id: bytes) -> int:
        """End every subscription of ``node_id`` (a push to it failed)."""
        keys = [key for key, subs in self._by_key.items() if node_id in subs]
        for key in keys:
            self.unsubscribe(key, node_id)
        return len(keys)

    def subscribers(self, key: bytes, now: float) -> list[Subscriber]:
        """The live subscribers under ``key`` (expired leases are dropped on the way)."""
        subs = self._by_key.get(key)
        if not subs:
            return []
        for s in [s for s in subs.values() if s.until <= now]:
            self.unsubscribe(key, s.node_id)
        return list(self._by_key.get(key, {}).values())

    def expire(self, now: float) -> int:
        dead = [(key, s.node_id) for key, subs in self._by_key.items() for s in subs.values() if s.until <= now]
        for key, node_id in dead:
            self.unsubscribe(key, node_id)
        return len(dead)

    def per_peer(self, node_id: bytes) -> int:
        return self._per_peer.get(node_id, 0)

    def stats(self) -> dict[str, int]:
        return {"watch_subscriptions": self._total, "watch_keys": len(self._by_key), "watch_refused": self.refused}


class WatchLog:
    """What a watch panel shows: the latest changes (newest first) and the provider set they describe."""

    def __init__(self, max_rows: int = 200):
        self.rows: deque[dict[str, Any]] = deque(maxlen=max_rows)
        self.providers: dict[str, Provider] = {}  # node id hex -> provider
        self.index: int | None = None
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)

    def apply(self, event: WatchEvent) -> None:
        self.counts[event.kind] = self.counts.get(event.kind, 0) + 1
        self.index = event.index
        if event.kind == "reset":
            self.providers = {p.node_id: p for p in event.providers}
            names = ", ".join(sorted(p.name for p in event.providers)) or "none"
            self.rows.appendleft(self._row(event, f"{len(event.providers)} providers: {names}", ""))
            return
        p = event.provider
        assert p is not None
        if event.kind in ("added", "updated"):
            self.providers[p.node_id] = p
        else:
            self.providers.pop(p.node_id, None)
        self.rows.appendleft(self._row(event, p.name, p.endpoint))

    @staticmethod
    def _row(event: WatchEvent, provider: str, endpoint: str) -> dict[str, Any]:
        return {"index": event.index, "kind": event.kind, "provider": provider, "endpoint": endpoint, "at": event.at}

    def current(self) -> list[Provider]:
        return sorted(self.providers.values(), key=lambda p: p.name)
