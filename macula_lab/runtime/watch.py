"""Watches: ``node.watch(service)``, a service's provider set as an async stream of changes.

How a watching node learns of changes (the decisions are in
:mod:`macula_lab.core.watch`; this module does the I/O):

1. **As a replica.**  Every STORE, REMOVE and expiry that changes this node's
   own records under the key is reported by the DHT's record listener.
2. **By subscription.**  The node sends WATCH to the few replicas closest to
   the key (the ones every STORE reaches before it returns); each holds the
   subscription as a lease and pushes WATCH_EVENT when its record set under
   the key changes.  Pushes to one subscriber go out one at a time, in order,
   from a bounded queue; a push that fails ends the subscription (the
   subscriber's next read renews it).
3. **By reconciliation.**  Periodically, a lookup finds the closest replicas
   again, the WATCH renews the leases and its reply carries each replica's
   current set: their union is the read that catches a missed push, a replica
   that died, or a new closest one.  The interval adapts: it halves back to the
   minimum when a read found a change the pushes had not delivered or a
   replica failed, and doubles up to the maximum while pushes keep up.  So a
   change a push missed is seen within one maximum interval (plus a lookup).

Every network await has a timeout, and an exception from one replica is that
replica's failure.  One :class:`~macula_lab.core.watch.ProviderSet` per
watched service is shared by the node's watches of it and outlives the last of
them by :data:`LINGER` seconds, so a watcher that reconnects with ``since=``
finds the changes it missed in its bounded history.  A replica holds at most
32 subscriptions per peer and 2,048 in total (each a lease of at most 120 s).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..core import params
from ..core.ids import service_key
from ..core.messages import Frame, MessageType
from ..core.records import ProviderEntry
from ..core.session import PeerInfo
from ..core.watch import ProviderSet, SubscriberTable, WatchEvent
from ..errors import InvalidField, NotStarted, QuotaExceeded
from .dht import NotAuthorized

if TYPE_CHECKING:
    from .dht import Dht
    from .host import Host

log = logging.getLogger(__name__)

#: replicas a watching node subscribes at (the few closest: every STORE reaches them before it returns)
SUBSCRIBE_FANOUT = 3
DEFAULT_MIN_INTERVAL = 0.5
DEFAULT_MAX_INTERVAL = 5.0
#: a watched service's state outlives its last watch by this long (resuming with ``since=``)
LINGER = 60.0
#: services one node watches at once (its own watches, and the ones it runs for attached clients)
MAX_SERVICES_WATCHED = 256
#: pushes queued for one subscriber; beyond, the oldest are dropped (its reconciliation catches up)
MAX_PUSH_QUEUE = 64
MAX_VALUES = 100


class Watch:
    """One watch of a service: ``async for event in node.watch(name)``.

    The first event is a ``reset`` with the whole provider set (or, resuming
    with ``since=``, the held events after that index, or a ``reset`` when
    they are not all held); then one event per change, with increasing
    ``index``.  Iteration ends when the watch is closed or the node stops.
    """

    def __init__(self, owner: _ServiceWatch, since: int | None):
        self._owner = owner
        self._wake = asyncio.Event()
        self.closed = False
        #: the index of the last event yielded (resume from it with ``watch(service, since=...)``)
        self.index: int | None = since

    @property
    def service(self) -> str:
        return self._owner.set.service

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        event = await self.next()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event (None once the watch ended); TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not self.closed:
                await self._owner.ready.wait()
                event = self.take()
                if event is not None:
                    return event
                self._wake.clear()
                await self._wake.wait()
        return None

    def take(self) -> WatchEvent | None:
        """The next event if one is held now, without waiting."""
        if self.closed or not self._owner.ready.is_set():
            return None
        s = self._owner.set
        held = None if self.index is None else s.since(self.index)
        if held is None:
            event = s.reset()
        elif held:
            event = held[0]
        else:
            return None
        self.index = event.index
        return event

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._wake.set()
            self._owner.detach(self)

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Watch {self.service} index={self.index}{' closed' if self.closed else ''}>"


class _ServiceWatch:
    """What a node knows of one watched service, shared by its watches."""

    def __init__(self, service: str, key: bytes, now: float):
        self.key = key
        self.set = ProviderSet(service)
        self.consumers: set[Watch] = set()
        self.replicas: dict[bytes, float] = {}  # subscribed at -> lease end: pushes accepted from these
        self.ready = asyncio.Event()
        self.idle_since: float | None = now
        self.interval = DEFAULT_MIN_INTERVAL
        self.reads = 0
        self.missed = 0  # changes a read found that no push had delivered
        self.task: asyncio.Task | None = None

    def apply(self, kind: str, entry: ProviderEntry, now: float) -> WatchEvent | None:
        if kind == "stored":
            event = self.set.observe(entry, now)
        else:
            event = self.set.left(entry.node_id, entry.seq, kind)
        if event is not None:
            self.wake()
        return event

    def wake(self) -> None:
        for c in self.consumers:
            c._wake.set()

    def detach(self, w: Watch) -> None:
        self.consumers.discard(w)
        if not self.consumers:
            try:
                self.idle_since = asyncio.get_running_loop().time()
            except RuntimeError:  # closed outside the loop: the default loop's clock is monotonic
                self.idle_since = time.monotonic()

    def end(self) -> None:
        for c in list(self.consumers):
            c.closed = True
            c._wake.set()
        self.consumers.clear()
        self.ready.set()


class Watches:
    """A node's watches and the subscriptions it holds as a replica (see the module docstring)."""

    def __init__(
        self,
        host: Host,
        dht: Dht,
        *,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        max_interval: float = DEFAULT_MAX_INTERVAL,
    ):
        self.host = host
        self.dht = dht
        self.max_interval = max_interval
        self.min_interval = min(min_interval, max_interval)
        self.subscribers = SubscriberTable()
        #: push to subscribers (off: a replica whose pushes are all lost, to measure the reads alone)
        self.pushing = True
        self._services: dict[bytes, _ServiceWatch] = {}
        self._outbox: dict[bytes, deque[tuple[str, dict[str, Any]]]] = {}
        self._senders: set[bytes] = set()
        self.counters = {
            "pushes_sent": 0,
            "pushes_failed": 0,
            "pushes_dropped": 0,
            "pushes_received": 0,
            "pushes_ignored": 0,
            "reads": 0,
            "read_failures": 0,
            "missed_by_push": 0,
        }
        host.route(MessageType.WATCH, self._on_watch)
        host.route(MessageType.WATCH_EVENT, self._on_watch_event)
        dht.on_record_change(self._on_record_change)

    @property
    def timeout(self) -> float:
        """One WATCH or push: a few query timeouts (a first contact includes a handshake)."""
        return max(2.0, 4 * self.dht.query_timeout)

    @property
    def lease(self) -> float:
        """What a subscriber asks for: three reads' worth, so one lost read does not end it."""
        return min(params.MAX_WATCH_LEASE, max(10.0, 3 * self.max_interval))

    # ------------------------------------------------------------- watch
    def watch(self, service: str, *, since: int | None = None) -> Watch:
        """Watch ``service``'s providers (see :class:`Watch`); ``since``: resume after that index."""
        params.check_service_name(service)
        if since is not None:
            since = params.check_watch_index(since, "since")
        key = service_key(self.host.realm, service)
        sw = self._services.get(key)
        if sw is None or (sw.task is not None and sw.task.done()):
            sw = self._start(service, key)
        w = Watch(sw, since)
        sw.consumers.add(w)
        sw.idle_since = None
        return w

    def _start(self, service: str, key: bytes) -> _ServiceWatch:
        now = self.host.now()
        if len(self._services) >= MAX_SERVICES_WATCHED:
            idle = [k for k, s in self._services.items() if not s.consumers]
            if not idle:
                raise QuotaExceeded(f"a node watches at most {MAX_SERVICES_WATCHED} services at once")
            oldest = min(idle, key=lambda k: self._services[k].idle_since or now)
            self._stop(self._services[oldest])
        sw = _ServiceWatch(service, key, now)
        sw.interval = self.min_interval
        sw.task = self.host.spawn(self._run(sw), name=f"{self.host.name}:watch:{service}")
        if sw.task is None:
            raise NotStarted(f"node {self.host.name} is not started")
        self._services[key] = sw
        return sw

    def _stop(self, sw: _ServiceWatch) -> None:
        if self._services.get(sw.key) is sw:
            del self._services[sw.key]
        if sw.task is not None:
            sw.task.cancel()
        sw.end()

    async def _run(self, sw: _ServiceWatch) -> None:
        """Read and (re)subscribe, at the adaptive interval, until the last watch left long enough ago."""
        try:
            while True:
                started = self.host.now()
                try:
                    entries, removed, complete, failed = await self._read(sw)
                except Exception as exc:  # a failed read is retried soon; the watch goes on
                    self.counters["read_failures"] += 1
                    log.debug("%s: watch read of %s failed: %s", self.host.name, sw.set.service, exc)
                    entries, removed, complete, failed = [], {}, False, 1
                now = self.host.now()
                # no replica answered (not complete): what we saw is there, but absence proves nothing
                events = sw.set.reconcile(entries, started, now, removed=removed, complete=complete)
                first = not sw.ready.is_set()
                sw.reads += 1
                self.counters["reads"] += 1
                if events and not first:
                    sw.missed += len(events)
                    self.counters["missed_by_push"] += len(events)
                if (events and not first) or failed or not complete:
                    sw.interval = self.min_interval
                else:
                    sw.interval = min(self.max_interval, sw.interval * 2)
                sw.ready.set()
                if events:
                    sw.wake()
                if not sw.consumers and sw.idle_since is not None and now - sw.idle_since > LINGER:
                    return
                await asyncio.sleep(sw.interval)
        finally:
            if self._services.get(sw.key) is sw:
                del self._services[sw.key]
            sw.end()

    async def _read(self, sw: _ServiceWatch) -> tuple[list[ProviderEntry], dict[bytes, int], bool, int]:
        """Subscribe at the closest replicas: their sets merged with ours (best per provider), the
        removals they saw (tombstones, see ProviderSet.reconcile), whether any answered, failures."""
        key = sw.key
        async with asyncio.timeout(self.timeout + 8 * self.dht.query_timeout):
            result = await self.dht.lookup(key, width=max(SUBSCRIBE_FANOUT, self.dht.alpha))
        closest = [c for c in result.closest if c.node_id != self.host.node_id][:SUBSCRIBE_FANOUT]
        now = self.host.now()
        for c in closest:  # a push may overtake the WATCH reply: accept it from the start
            sw.replicas[c.node_id] = max(sw.replicas.get(c.node_id, 0.0), now + self.timeout)
        replies = await asyncio.gather(*(self._subscribe(c.endpoint, key) for c in closest), return_exceptions=True)
        now = self.host.now()
        best: dict[bytes, ProviderEntry] = {}
        removed: dict[bytes, int] = {}  # provider -> highest seq a replica saw removed
        answered = failed = 0
        for c, reply in zip(closest, replies, strict=True):
            if isinstance(reply, BaseException):
                if isinstance(reply, asyncio.CancelledError):
                    raise reply
                failed += 1
                sw.replicas.pop(c.node_id, None)
                continue
            answered += 1
            sw.replicas[c.node_id] = now + float(reply.body["lease"])
            for item in reply.body["value"][:MAX_VALUES]:
                try:
                    entry = ProviderEntry.from_wire(item)
                except InvalidField:
                    continue
                _keep_best(best, replace(entry, expires_at=now + entry.ttl))
            _tombstones(removed, reply.body.get("removed"))
        for entry in self.dht.get_local(key):
            _keep_best(best, entry)
        for node_id, seq in self.dht.records.removed(key, now):
            removed[node_id] = max(seq, removed.get(node_id, seq))
        for node_id in [n for n, until in sw.replicas.items() if until <= now]:
            del sw.replicas[node_id]
        return list(best.values()), removed, answered > 0 or not closest, failed

    async def _subscribe(self, endpoint: str, key: bytes) -> Frame:
        async with asyncio.timeout(self.timeout):
            return await self.host.request(
                endpoint, MessageType.WATCH, {"key": key, "lease": self.lease}, timeout=self.timeout
            )

    # ---------------------------------------------------- as the watcher
    def _on_watch_event(self, frame: Frame, peer: PeerInfo):
        body = frame.body
        sw = self._services.get(body["key"])
        now = self.host.now()
        if sw is None or sw.replicas.get(peer.node_id, 0.0) <= now:
            # not a replica we subscribed at (or no longer): it stops pushing
            self.counters["pushes_ignored"] += 1
            return MessageType.WATCH_EVENT_REPLY, {"ok": False}
        entry = ProviderEntry.from_wire(body["value"])  # InvalidField -> ERROR reply
        self.counters["pushes_received"] += 1
        sw.apply(body["kind"], replace(entry, expires_at=now + entry.ttl), now)
        return MessageType.WATCH_EVENT_REPLY, {"ok": True}

    # ---------------------------------------------------- as the replica
    def _on_watch(self, frame: Frame, peer: PeerInfo):
        if not peer.endpoint:  # attached clients watch through their node's gateway
            raise NotAuthorized(f"{peer.name or peer.short_id} is not a node: WATCH refused")
        key = frame.body["key"]
        now = self.host.now()
        lease = self.subscribers.subscribe(key, peer.node_id, peer.endpoint, frame.body["lease"], now)
        value = [e.to_wire(now) for e in self.dht.get_local(key)[:MAX_VALUES]]
        removed = [[p, seq] for p, seq in self.dht.records.removed(key, now)[:MAX_VALUES]]
        return MessageType.WATCH_REPLY, {"lease": lease, "value": value, "removed": removed}

    def _on_record_change(self, kind: str, key: bytes, entry: ProviderEntry) -> None:
        now = self.host.now()
        sw = self._services.get(key)
        if sw is not None:
            sw.apply(kind, entry, now)
        subs = self.subscribers.subscribers(key, now)
        if not subs or not self.pushing:
            return
        # a record that left carries its advertised ttl: only its id and seq matter then
        body = {"key": key, "kind": kind, "value": entry.to_wire(now if kind == "stored" else None)}
        for s in subs:
            if s.node_id != self.host.node_id:
                self._enqueue(s.node_id, s.endpoint, body)

    def _enqueue(self, node_id: bytes, endpoint: str, body: dict[str, Any]) -> None:
        queue = self._outbox.setdefault(node_id, deque())
        if len(queue) >= MAX_PUSH_QUEUE:
            queue.popleft()
            self.counters["pushes_dropped"] += 1
        queue.append((endpoint, body))
        if node_id not in self._senders:
            if self.host.spawn(self._drain(node_id), name=f"{self.host.name}:watch-push") is not None:
                self._senders.add(node_id)

    async def _drain(self, node_id: bytes) -> None:
        """Push one subscriber's queued events in order; on a failure drop them and its subscriptions."""
        try:
            queue = self._outbox.get(node_id)
            while queue:
                endpoint, body = queue.popleft()
                try:
                    async with asyncio.timeout(self.timeout):
                        reply = await self.host.request(
                            endpoint, MessageType.WATCH_EVENT, dict(body), timeout=self.timeout
                        )
                except Exception as exc:  # this subscriber's failure: it resubscribes on its next read
                    self.counters["pushes_failed"] += 1
                    log.debug("%s: watch push to %s failed: %s", self.host.name, endpoint, exc)
                    queue.clear()
                    self.subscribers.drop_peer(node_id)
                    return
                self.counters["pushes_sent"] += 1
                if not reply.body.get("ok"):
                    self.subscribers.unsubscribe(body["key"], node_id)
        finally:
            self._senders.discard(node_id)
            if not self._outbox.get(node_id):
                self._outbox.pop(node_id, None)

    # ------------------------------------------------------ observability
    def stats(self) -> dict[str, Any]:
        return {
            "watched_services": len(self._services),
            "watches": sum(len(s.consumers) for s in self._services.values()),
            **self.subscribers.stats(),
            **self.counters,
        }

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {
                "service": s.set.service,
                "watches": len(s.consumers),
                "providers": len(s.set.present),
                "index": s.set.index,
                "interval": s.interval,
                "replicas": len(s.replicas),
                "reads": s.reads,
                "missed_by_push": s.missed,
            }
            for s in self._services.values()
        ]


def _tombstones(removed: dict[bytes, int], items: Any) -> None:
    """Merge a WATCH reply's [provider, seq] pairs into ``removed`` (malformed ones skipped)."""
    for item in items[:MAX_VALUES] if isinstance(items, list) else ():
        if (
            isinstance(item, list | tuple)
            and len(item) == 2
            and isinstance(item[0], bytes)
            and len(item[0]) == 32
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
        ):
            removed[item[0]] = max(item[1], removed.get(item[0], item[1]))


def _keep_best(best: dict[bytes, ProviderEntry], entry: ProviderEntry) -> None:
    current = best.get(entry.node_id)
    if current is None or (entry.seq, entry.expires_at or 0) > (current.seq, current.expires_at or 0):
        best[entry.node_id] = entry
