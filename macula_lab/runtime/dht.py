"""The DHT runtime: drives the sans-I/O Kademlia core over a node's transport.

The decisions live in :mod:`macula_lab.core` (routing table, lookup state
machine, record store); this module only does the I/O: it answers FIND_NODE,
FIND_VALUE, STORE and REMOVE, runs iterative lookups with ``alpha`` queries in
flight and a short per-query timeout, replicates provider records to the k
closest nodes, hands records over to newcomers, expires records at their TTL and
refreshes stale buckets.

Every node we hear from (a request it sent us, or a reply to ours) is offered to
the routing table; a full bucket asks us to ping its least recently seen
contact first and evicts it only if that ping fails.

Timing: all times are the node's loop clock (``loop.time()``); TTLs are
enforced by every storing node (:meth:`Dht.get_local` never returns an expired
entry, and a sweeper removes them at their expiry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..core.ids import bucket_index, hex_short, random_id_in_bucket, service_key, xor_distance
from ..core.lookup import Lookup, LookupResult
from ..core.messages import Frame, MessageType
from ..core.params import DEFAULT_ALPHA, DEFAULT_K, DEFAULT_QUERY_TIMEOUT
from ..core.records import ProviderEntry, RecordStore, keys_to_hand_over
from ..core.routing import Contact, PingNeeded, RoutingTable
from ..core.session import PeerInfo
from ..errors import InvalidField, MaculaError
from ..transport.base import raise_for_error, wall_time

if TYPE_CHECKING:
    from .host import Host

log = logging.getLogger(__name__)

DEFAULT_REFRESH_INTERVAL = 3600.0
#: acknowledged replicas a publication waits for before returning (the others complete in the background)
STORE_QUORUM = 3
MAX_CONTACTS_PER_REPLY = 64
MAX_VALUES_PER_REPLY = 100


class NotAuthorized(MaculaError):
    code = "not_authorized"


@dataclass(frozen=True)
class LookupRecord:
    """What one lookup did (kept for the lab's views and metrics)."""

    kind: str  # "find_node", "find_value", "store", "remove", "bootstrap", "refresh"
    target: str  # hex prefix
    hops: int
    contacted: int
    failures: int
    duration: float
    found: bool
    at: float = field(default_factory=wall_time)


@dataclass
class StoreResult:
    """How a publication went: the replicas that acknowledged it so far.

    ``replicas`` and ``asked`` grow after :meth:`Dht.store` returned, as the
    second phase finds the rest of the k closest and they acknowledge;
    ``done`` is set when the last STORE ended.
    """

    key: bytes
    replicas: list[Contact]  # nodes that acknowledged the STORE (this node included if it is one)
    lookup: LookupResult
    asked: list[bytes] = field(default_factory=list)  # ids the STORE went to (this node's if it is one)
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def count(self) -> int:
        return len(self.replicas)

    @property
    def targets(self) -> int:
        """How many nodes the STORE went to so far (this node included if it is one)."""
        return len(self.asked)


class Dht:
    """Kademlia for one node (its :class:`~.host.Host`); implements :class:`~.interfaces.Directory`."""

    def __init__(
        self,
        host: Host,
        *,
        k: int = DEFAULT_K,
        alpha: int = DEFAULT_ALPHA,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        record_store: RecordStore | None = None,
    ):
        self.host = host
        self.k = k
        self.alpha = alpha
        self.query_timeout = query_timeout
        self.refresh_interval = refresh_interval
        self.table = RoutingTable(host.node_id, k=k)
        self.records = record_store or RecordStore()
        # STOREs still running in the background, per key: a REMOVE waits for them, or one of
        # them landing after it would put the removed entry back on its replica
        self._storing: dict[bytes, list[StoreResult]] = {}
        self.lookups: deque[LookupRecord] = deque(maxlen=500)
        self.rtt = RttEstimator(ceiling=query_timeout)
        self._handed_over: OrderedDict[bytes, None] = OrderedDict()  # newcomers already served
        #: why the last join attempt found no contact ("" once joined)
        self.last_join_error = ""
        self.counters = {
            "stores_accepted": 0,
            "stores_refused": 0,
            "removes": 0,
            "expired": 0,
            "handovers": 0,
            "bad_items": 0,
            # failures of one contact that were not a network error (a bug or a hostile reply):
            # that contact's failure, never the end of a lookup or a loop
            "contact_errors": 0,
        }
        self._wake_sweeper = asyncio.Event()
        self._record_listeners: list[Callable[[str, bytes, ProviderEntry], None]] = []
        self.records.listener = self._record_changed
        host.route(MessageType.FIND_NODE, self._on_find_node)
        host.route(MessageType.FIND_VALUE, self._on_find_value)
        host.route(MessageType.STORE, self._on_store)
        host.route(MessageType.REMOVE, self._on_remove)
        host.observe_peers(self._on_peer)

    # -------------------------------------------------------------- clock
    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def start(self) -> None:
        """Start the background work (called by the node once it is listening)."""
        self._wake_sweeper = asyncio.Event()
        self.host.spawn(self._sweep_expired(), name=f"{self.host.name}:dht-expiry")
        self.host.spawn(self._refresh_buckets(), name=f"{self.host.name}:dht-refresh")

    def on_record_change(self, fn: Callable[[str, bytes, ProviderEntry], None]) -> None:
        """Call ``fn(kind, key, entry)`` when this replica's provider set under a key changes (watches)."""
        self._record_listeners.append(fn)

    def _record_changed(self, kind: str, key: bytes, entry: ProviderEntry) -> None:
        for fn in self._record_listeners:
            try:
                fn(kind, key, entry)
            except Exception:  # a listener's bug must not fail the STORE or the sweep that changed the record
                log.exception("%s: record-change listener failed", self.host.name)

    # ------------------------------------------------------- contacts in
    def _on_peer(self, peer: PeerInfo) -> None:
        """A request came in from ``peer``: it is alive, maybe new to us."""
        if peer.endpoint and peer.node_id != self.host.node_id:
            self._observe(Contact(peer.node_id, peer.endpoint, peer.name))

    def _observe(self, contact: Contact) -> None:
        try:
            now = self.now()
        except RuntimeError:  # no running loop (not started)
            return
        is_new = contact.node_id not in self.table
        decision = self.table.observe(contact, now)
        if isinstance(decision, PingNeeded):
            self.host.spawn(self._ping_oldest(decision), name=f"{self.host.name}:dht-ping")
        # a newcomer gets the records it is now responsible for, even if its bucket here
        # is full (it waits in the replacement cache, but other nodes will route to it)
        if is_new and len(self.records) and contact.node_id not in self._handed_over:
            self._handed_over[contact.node_id] = None
            if len(self._handed_over) > 4096:
                self._handed_over.popitem(last=False)
            self._hand_over(contact)

    async def _ping_oldest(self, decision: PingNeeded) -> None:
        oldest = decision.oldest
        try:
            async with asyncio.timeout(self.query_timeout):
                await self.host.ping(oldest.endpoint)
            alive = True
        except Exception as exc:  # whatever went wrong, it is that contact's failure
            self._note_unexpected(oldest, exc)
            alive = False
        self.table.ping_result(oldest.node_id, alive, self.now())

    def _note_unexpected(self, contact: Contact, exc: BaseException) -> None:
        """Count (and log) a contact failure that was not a network error."""
        if not isinstance(exc, MaculaError | OSError | TimeoutError):
            self.counters["contact_errors"] += 1
            log.debug("%s: contact %s failed: %s: %s", self.host.name, contact.name, type(exc).__name__, exc)

    def _hand_over(self, contact: Contact) -> None:
        keys = keys_to_hand_over(self.records.keys(), contact, self.table, self.k)
        if keys:
            self.counters["handovers"] += len(keys)
            self.host.spawn(self._send_records(contact, keys), name=f"{self.host.name}:dht-handover")

    async def _send_records(self, contact: Contact, keys: list[bytes]) -> None:
        now = self.now()
        for key in keys:
            for entry in self.records.get(key, now):
                try:
                    await self._request(contact, MessageType.STORE, {"key": key, "value": entry.to_wire(now)})
                except Exception as exc:  # the newcomer's failure: stop handing over to it
                    self._note_unexpected(contact, exc)
                    log.debug("handover of %s to %s failed: %s", hex_short(key), contact.name, exc)
                    return

    # ---------------------------------------------------------- handlers
    def _closest_wire(self, target: bytes, requester: bytes) -> list[dict[str, Any]]:
        contacts = self.table.closest(target, self.k, exclude=(requester,))
        return [c.to_wire() for c in contacts[:MAX_CONTACTS_PER_REPLY]]

    def _on_find_node(self, frame: Frame, peer: PeerInfo):
        return MessageType.FIND_NODE_REPLY, {"nodes": self._closest_wire(frame.body["target"], peer.node_id)}

    def _on_find_value(self, frame: Frame, peer: PeerInfo):
        key = frame.body["key"]
        now = self.now()
        entries = self.records.get(key, now)
        if entries and not frame.body.get("all"):
            # the reader stops at the first value (Kademlia's FIND_VALUE): contacts would only
            # double the reply (20 of them do not fit one QUIC packet) and be thrown away
            return MessageType.FIND_VALUE_REPLY, {
                "nodes": [],
                "value": [e.to_wire(now) for e in entries[:MAX_VALUES_PER_REPLY]],
            }
        body: dict[str, Any] = {"nodes": self._closest_wire(key, peer.node_id)}
        if entries:
            body["value"] = [e.to_wire(now) for e in entries[:MAX_VALUES_PER_REPLY]]
        return MessageType.FIND_VALUE_REPLY, body

    def _on_store(self, frame: Frame, peer: PeerInfo):
        if not peer.endpoint:  # an attached client advertises through its node's gateway
            raise NotAuthorized(f"{peer.name or peer.short_id} is not a node: STORE refused")
        entry = ProviderEntry.from_wire(frame.body["value"])  # InvalidField -> ERROR reply
        # the session peer is authenticated: its own entry is authoritative, another's is a copy
        ok = self.records.store(frame.body["key"], entry, self.now(), source=peer.node_id)
        self.counters["stores_accepted" if ok else "stores_refused"] += 1
        if ok:
            self._wake_sweeper.set()
        return MessageType.STORE_REPLY, {"stored": ok}

    def _on_remove(self, frame: Frame, peer: PeerInfo):
        key, provider = frame.body["key"], frame.body["provider"]
        # only the provider itself may withdraw its entry (a node relaying for an attached
        # client advertises as itself, so it is the provider)
        if peer.node_id != provider:
            raise NotAuthorized(f"{peer.name or peer.short_id} may not remove provider {hex_short(provider)}")
        removed = self.records.remove(key, provider, self.now())
        self.counters["removes"] += int(removed)
        return MessageType.REMOVE_REPLY, {"removed": removed}

    # ---------------------------------------------------------- requests
    def _start_query(
        self, contact: Contact, mtype: MessageType, body: dict[str, Any], wake: _Wakeup
    ) -> _Query | None:
        """Send one lookup query; None if the node is stopping.

        Over an open session the request goes out at once and the lookup waits on
        its reply future: no task or coroutine per query (a task and its nested
        awaits cost about as much as the DHT logic of a whole lookup).  Otherwise
        (a connect first) it runs as a node-owned task.  Either way a query may
        outlive its lookup: a peer the lookup stopped waiting for still gets its
        reply or its hard timeout recorded, so dead contacts leave the routing
        table instead of slowing every lookup.
        """
        body = dict(body)  # its own request id
        try:
            fut = self.host.send_request(
                contact.endpoint, mtype, body, timeout=self.query_timeout, notify=wake
            )
        except MaculaError:  # the session closed just now: let the slow path reconnect
            fut = None
        except Exception as exc:  # this contact cannot even be asked: its failure, not the lookup's
            self._note_unexpected(contact, exc)
            self.table.failed(contact.node_id, self.now())
            return None
        if fut is not None:
            return _Query(fut, contact, self.now(), direct=True)
        task = self.host.spawn(self._query(contact, mtype, body), name=f"{self.host.name}:query")
        if task is None:
            return None
        task.add_done_callback(wake)
        return _Query(task, contact, self.now(), direct=False)

    def _outcome(self, q: _Query) -> Frame | MaculaError:
        """The finished query's reply or failure (a direct one is checked and recorded here)."""
        if not q.direct:
            return q.fut.result()  # _query() did the checks
        if q.fut.cancelled():
            return _QueryFailed("cancelled")
        try:
            reply = self._checked(q.contact, raise_for_error(q.fut.result()))
        except Exception as err:
            self._note_unexpected(q.contact, err)
            self.table.failed(q.contact.node_id, self.now())
            return err if isinstance(err, MaculaError) else _QueryFailed(f"{type(err).__name__}: {err}")
        self.rtt.sample(self.now() - q.started)
        return reply

    def _settle_later(self, q: _Query) -> None:
        """A direct query the lookup no longer waits for: record its outcome (when it ends)."""
        if not q.direct:
            return  # a task: _query() records it
        if q.fut.done():
            self._outcome(q)
        else:
            q.fut.add_done_callback(lambda _fut: self._outcome(q))

    async def _query(self, contact: Contact, mtype: MessageType, body: dict[str, Any]) -> Frame | MaculaError:
        """One query as a task (see _start_query); failures are returned, not raised."""
        t0 = self.now()
        try:
            reply = await self._request(contact, mtype, body)
        except Exception as exc:  # whatever it is, it is this contact's failure
            self._note_unexpected(contact, exc)
            self.table.failed(contact.node_id, self.now())
            return exc if isinstance(exc, MaculaError) else _QueryFailed(f"{type(exc).__name__}: {exc}")
        self.rtt.sample(self.now() - t0)
        return reply

    async def _request(self, contact: Contact, mtype: MessageType, body: dict[str, Any]) -> Frame:
        """One query, bounded by the per-query timeout (connecting included)."""
        try:
            async with asyncio.timeout(self.query_timeout):
                reply = await self.host.request(contact.endpoint, mtype, body, timeout=self.query_timeout)
        except TimeoutError:
            raise _QueryFailed(
                f"{contact.name or contact.short_id} did not answer within {self.query_timeout:g}s"
            ) from None
        except MaculaError as exc:
            raise _QueryFailed(str(exc)) from exc
        return self._checked(contact, reply)

    def _checked(self, contact: Contact, reply: Frame) -> Frame:
        """``contact`` answered: still the node we think it is?  Then it is alive."""
        peer = self.host.session(contact.endpoint)
        if peer is not None and peer.node_id != contact.node_id:
            # the endpoint now belongs to another node: the contact is stale
            self.table.remove(contact.node_id)
            self._observe(Contact(peer.node_id, contact.endpoint, peer.name))
            raise _QueryFailed(f"{contact.endpoint} is now node {peer.short_id}")
        self._observe(contact)
        return reply

    def _parse_contacts(self, items: Any) -> list[Contact]:
        out = []
        for item in items[:MAX_CONTACTS_PER_REPLY] if isinstance(items, list) else ():
            try:
                out.append(Contact.from_wire(item))
            except InvalidField:
                self.counters["bad_items"] += 1
        return out

    def _parse_values(self, items: Any) -> list[ProviderEntry]:
        out = []
        for item in items[:MAX_VALUES_PER_REPLY] if isinstance(items, list) else ():
            try:
                out.append(ProviderEntry.from_wire(item))
            except InvalidField:
                self.counters["bad_items"] += 1
        return out

    # ------------------------------------------------------------ lookup
    async def lookup(
        self,
        target: bytes,
        *,
        kind: str = "find_node",
        collect_values: bool = False,
        patient: bool = False,
        width: int | None = None,
    ) -> LookupResult:
        """Iterative lookup of ``target``: the k closest live nodes (and values if asked).

        Reads (``patient=False``) stop waiting for a peer after the adaptive soft
        timeout, so a dead contact costs a few round trips.  Writes (store,
        remove, join) are ``patient``: they wait up to the hard per-query timeout
        for every candidate, because putting a record on the wrong nodes costs
        more than a slower write.
        """
        find_value = collect_values or kind == "find_value"
        clock = asyncio.get_running_loop().time
        now = clock()
        width = width or self.k
        # reads that stop at the first replica ask the closest contact alone first: in a
        # warm table it usually holds the record, and one query costs a third of alpha
        hedged = find_value and not patient and not collect_values
        lk = Lookup(
            target,
            self.table.closest(target, 1 if hedged else width),
            k=width,
            alpha=self.alpha,
            self_id=self.host.node_id,
            find_value=find_value,
            collect_values=collect_values,
            hedged=hedged,
            # the other seeds only if the read widens (see core.lookup)
            more_seeds=(lambda: self.table.closest(target, width)) if hedged else None,
            now=now,
        )
        hedge_until = now + self.rtt.hedge_delay() if lk.hedging else None
        mtype = MessageType.FIND_VALUE if find_value else MessageType.FIND_NODE
        # exhaustive reads (collect_values) go on to the k closest: they need contacts with values
        query = (
            {"key": target, "all": True} if collect_values else {"key" if find_value else "target": target}
        )
        running: dict[asyncio.Future, _Query] = {}
        wake = _Wakeup()
        slow: set[bytes] = set()  # given up on by the soft timeout, query still running
        grace_used = False
        try:
            while True:
                if lk.done:
                    # before answering, give peers we gave up on one more soft timeout: under
                    # load a live node can be slow, and the answer should not miss it; a dead
                    # one costs this lookup at most that much extra
                    if grace_used or (lk.found and not collect_values):
                        break
                    closest = lk.result().closest
                    kth = xor_distance(closest[-1].node_id, target) if len(closest) >= self.k else 1 << 256
                    late = [
                        f
                        for f, q in running.items()
                        if q.contact.node_id in slow and xor_distance(q.contact.node_id, target) < kth
                    ]
                    if not late:  # only a slow peer that would change the answer is worth waiting for
                        break
                    grace_used = True
                    soft = self.query_timeout if patient else self.rtt.timeout()
                    finished, _ = await asyncio.wait(late, timeout=soft)
                    self._take(lk, running, finished, find_value)
                    continue
                for contact in lk.next_queries(clock()):
                    q = self._start_query(contact, mtype, query, wake)
                    if q is None:  # the node is stopping
                        lk.on_failure(contact.node_id, clock())
                        continue
                    running[q.fut] = q
                if not running:
                    break
                # wake for the first reply, or when the oldest query passes the soft timeout
                soft = self.query_timeout if patient else self.rtt.timeout()
                wake_at = lk.next_deadline(soft)
                if hedge_until is not None and lk.hedging and (wake_at is None or hedge_until < wake_at):
                    wake_at = hedge_until
                finished = {f for f in running if f.done()}
                if not finished:
                    await wake.wait(wake_at)
                    finished = {f for f in running if f.done()}
                self._take(lk, running, finished, find_value)
                now = clock()
                if lk.hedging and hedge_until is not None and now >= hedge_until:
                    lk.widen()  # the first query is slow: ask alpha peers as a plain lookup would
                # slow peers: stop waiting for them in this lookup (their reply still counts if it
                # arrives before the end); the query itself runs on to the hard timeout
                for contact in lk.timed_out(now, soft):
                    lk.on_failure(contact.node_id, now)
                    slow.add(contact.node_id)
        finally:
            # queries still running (stragglers outside the k closest, or slow peers, or all of
            # them if this lookup was cancelled) are not waited for; they finish on their own
            # within the hard timeout and still tell the routing table
            for q in running.values():
                self._settle_later(q)
        result = lk.result(clock())
        self.lookups.append(
            LookupRecord(
                kind,
                target.hex()[:12],
                result.hops,
                result.contacted,
                result.failures,
                result.duration,
                bool(result.closest) or result.found,
            )
        )
        self._touch(target)
        return result

    def _take(
        self,
        lk: Lookup,
        running: dict[asyncio.Future, _Query],
        finished: set[asyncio.Future],
        find_value: bool,
    ) -> None:
        """Feed finished queries into the lookup."""
        for fut in finished:
            q = running.pop(fut)
            outcome = self._outcome(q)
            now = self.now()
            if isinstance(outcome, MaculaError):
                lk.on_failure(q.contact.node_id, now)
                continue
            body = outcome.body
            value = self._parse_values(body.get("value")) if find_value and "value" in body else None
            lk.on_reply(q.contact.node_id, self._parse_contacts(body.get("nodes")), now, value=value or None)

    def _touch(self, target: bytes) -> None:
        if target != self.host.node_id:
            self.table.touch_bucket(bucket_index(self.host.node_id, target), self.now())

    # ------------------------------------------------------- operations
    async def bootstrap(self, seeds: list[str]) -> int:
        """Join through ``seeds`` (endpoints): contact them, look ourselves up, refresh the far buckets.

        Returns the number of contacts in the routing table afterwards (0: no seed
        answered; :attr:`last_join_error` says why).
        """
        for seed in seeds:
            if seed == self.host.endpoint:
                continue
            try:
                async with asyncio.timeout(self.host.connect_timeout + 1):
                    peer = await self.host.connect(seed)
            except Exception as exc:  # one seed's failure, whatever it is: try the next
                self.last_join_error = f"bootstrap peer {seed} not reachable: {type(exc).__name__}: {exc}"
                log.warning("%s: %s", self.host.name, self.last_join_error)
                continue
            self._observe(Contact(peer.node_id, seed, peer.name))
        if len(self.table):
            result = await self.lookup(self.host.node_id, kind="bootstrap", patient=True, width=self.alpha)
            log.info(
                "%s joined: %d contacts after a self-lookup of %d hops (%d nodes contacted)",
                self.host.name,
                len(self.table),
                result.hops,
                result.contacted,
            )
            # as in the Kademlia paper: after the self-lookup, refresh the buckets farther
            # than our nearest neighbour, or a late joiner knows only its own corner and
            # lookups through it cannot reach the rest of the id space.  Only the farthest
            # *empty* ones (the far half, the far quarter): with 200 nodes in one process,
            # refreshing every sparse bucket per join made building the mesh 10x slower.
            # Part of the join: a node is ready when its table can route anywhere.
            await self._refresh_far_buckets()
            self.last_join_error = ""
        return len(self.table)

    async def _refresh_far_buckets(self, limit: int = 2) -> None:
        sizes = self.table.bucket_sizes()
        if not sizes:
            return
        nearest = min(sizes)
        empty = [i for i in range(255, nearest, -1) if not sizes.get(i)][:limit]
        for index in empty:
            # a narrow lookup (alpha wide, not k): a few contacts there are enough to route
            # through, and each new contact costs a QUIC handshake
            await self.lookup(random_id_in_bucket(self.host.node_id, index), kind="refresh", width=self.alpha)

    def _is_replica(self, key: bytes, closest: list[Contact]) -> bool:
        """Is this node among the k closest to ``key`` (given the lookup's closest)?"""
        if len(closest) < self.k:
            return True
        return xor_distance(self.host.node_id, key) < xor_distance(closest[self.k - 1].node_id, key)

    async def store(self, key: bytes, entry: ProviderEntry, *, quorum: int = STORE_QUORUM) -> StoreResult:
        """Store ``entry`` on the k closest nodes to ``key`` (this node too if it is one).

        In two phases, so that an advertise waits for a few replicas, not for the
        whole k-wide lookup: a narrow lookup (alpha wide) finds the closest nodes
        and the call returns once the ``quorum`` closest answered; the full k-wide
        lookup and the STOREs to the rest of the k closest run on in the
        background, owned by the host.  Each new contact costs a QUIC handshake,
        so the narrow phase is what keeps the first advertise fast.  The result's
        ``replicas`` keep growing after the return; its ``done`` event marks the end.
        """
        quorum = max(1, min(quorum, self.k))
        wire = entry.to_wire()
        narrow = await self.lookup(key, kind="store", patient=True, width=max(quorum, self.alpha))
        first = narrow.closest[:quorum]
        out = StoreResult(key, [], narrow)
        self._storing.setdefault(key, []).append(out)
        if self._closer_than(key, first):
            self._store_here(key, entry, out)
        tasks = self._send_stores(first, key, wire, out)
        rest = self.host.spawn(self._store_rest(key, entry, wire, out, tasks), name=f"{self.host.name}:store-rest")
        if rest is None:  # the node is stopping: nothing runs on in the background
            self._stored(key, out)
        # every one of the closest few, not any ``quorum`` acks (this node's own copy would count):
        # a read asks the closest replica first and trusts its answer, so it must hold the record
        if tasks:
            await asyncio.wait(tasks)
        if out.count < quorum:
            # the closest did not all take it: the write is only as good as the full round
            await out.done.wait()
        return out

    async def _store_rest(
        self, key: bytes, entry: ProviderEntry, wire: dict[str, Any], out: StoreResult, first: list[asyncio.Task]
    ) -> None:
        """The second phase: the full lookup, then STOREs to the k closest not yet asked."""
        try:
            full = await self.lookup(key, kind="store", patient=True)
            targets = full.closest[: self.k]
            out.lookup = full
            if self._is_replica(key, targets):
                targets = targets[: self.k - 1]  # we are one of the k: k copies, not k + 1
                self._store_here(key, entry, out)
            asked = set(out.asked)
            later = self._send_stores([c for c in targets if c.node_id not in asked], key, wire, out)
            await asyncio.gather(*first, *later, return_exceptions=True)
        finally:
            self._stored(key, out)

    def _stored(self, key: bytes, out: StoreResult) -> None:
        """The last STORE of ``out`` ended."""
        out.done.set()
        pending = self._storing.get(key)
        if pending is not None and out in pending:
            pending.remove(out)
            if not pending:
                del self._storing[key]

    def _among_closest(self, key: bytes, n: int) -> bool:
        """Is this node one of the ``n`` closest to ``key`` it knows of (itself included)?"""
        mine = xor_distance(self.host.node_id, key)
        return sum(xor_distance(c.node_id, key) < mine for c in self.table.closest(key, n)) < n

    def _closer_than(self, key: bytes, closest: list[Contact]) -> bool:
        """Is this node closer to ``key`` than the farthest of ``closest`` (or is that empty)?"""
        return not closest or xor_distance(self.host.node_id, key) < xor_distance(closest[-1].node_id, key)

    def _store_here(self, key: bytes, entry: ProviderEntry, out: StoreResult) -> None:
        if self.host.node_id in out.asked:
            return
        out.asked.append(self.host.node_id)
        if self.records.store(key, entry, self.now()):
            self._wake_sweeper.set()
            out.replicas.append(Contact(self.host.node_id, self.host.endpoint, self.host.name))

    def _send_stores(
        self, contacts: list[Contact], key: bytes, wire: dict[str, Any], out: StoreResult
    ) -> list[asyncio.Task]:
        out.asked.extend(c.node_id for c in contacts)
        tasks = (self.host.spawn(self._store_one(c, key, wire, out), name=f"{self.host.name}:store") for c in contacts)
        return [t for t in tasks if t is not None]

    async def _store_one(self, contact: Contact, key: bytes, wire: dict[str, Any], out: StoreResult) -> None:
        try:
            reply = await self._request(contact, MessageType.STORE, {"key": key, "value": wire})
        except Exception as exc:  # that replica's failure (already recorded by _request)
            self._note_unexpected(contact, exc)
            return
        if reply.body.get("stored"):
            out.replicas.append(contact)

    async def find(self, key: bytes, *, exhaustive: bool = False) -> tuple[list[ProviderEntry], LookupResult]:
        """The live provider entries stored under ``key``.

        By default, as in Kademlia, the answer of the first replica reached (or
        this node's own replica) is the answer: every provider STOREs to the same
        k closest nodes, so one replica holds them all, and re-advertisement
        repairs one that missed a STORE.  ``exhaustive=True`` asks all k closest
        and merges their entries per provider (highest seq, then latest expiry).
        Returned entries carry ``expires_at`` on this node's clock.
        """
        now = self.now()
        local = self.records.get(key, now)
        if local and not exhaustive and self._among_closest(key, STORE_QUORUM):
            # we are one of the few closest, which every store reaches before it returns; a
            # replica farther out gets its copy in the background and may not have it yet
            self.lookups.append(LookupRecord("find_value", key.hex()[:12], 0, 0, 0, 0.0, True))
            return local, LookupResult(target=key, closest=[], hops=0)
        result = await self.lookup(key, kind="find_value", collect_values=exhaustive)
        if not result.values and result.failures:
            # nothing found and some peers were given up on: ask again, waiting for everyone
            # (a miss must mean "not stored", not "a replica was slow")
            result = await self.lookup(key, kind="find_value", collect_values=exhaustive, patient=True)
        now = self.now()
        best: dict[bytes, ProviderEntry] = {}
        for values in result.values.values():
            for entry in values:
                _keep_best(best, replace(entry, expires_at=now + entry.ttl))
        for entry in self.records.get(key, now):  # our own replica, if we hold one
            _keep_best(best, entry)
        return [e for e in best.values() if e.live(now)], result

    async def remove(self, key: bytes, provider_id: bytes) -> int:
        """Remove one provider's entry from the k closest nodes (and here); returns how many removed it."""
        pending = [out.done.wait() for out in self._storing.get(key, ())]
        if pending:  # our own STOREs of this key still running must not land after the REMOVE
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.query_timeout * 4):
                    await asyncio.gather(*pending)
        result = await self.lookup(key, kind="remove", patient=True)
        replies = await asyncio.gather(
            *(
                self._request(c, MessageType.REMOVE, {"key": key, "provider": provider_id})
                for c in result.closest
            ),
            return_exceptions=True,
        )
        removed = sum(1 for r in replies if isinstance(r, Frame) and r.body.get("removed"))
        if self.records.remove(key, provider_id, self.now()):
            removed += 1
        return removed

    def get_local(self, key: bytes) -> list[ProviderEntry]:
        return self.records.get(key, self.now())

    # --------------------------------------------------------- background
    async def _sweep_expired(self) -> None:
        while True:
            nxt = self.records.next_expiry()
            # every store sets the event, so there is no need to poll: with nothing stored a
            # node sleeps until something is (10,000 idle nodes polling every 5 s cost a
            # simulation more than their lookups)
            delay = None if nxt is None else max(0.0, nxt - self.now())
            self._wake_sweeper.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation
            # that stops the node when the event fires at the same moment
            try:
                async with asyncio.timeout(delay):
                    await self._wake_sweeper.wait()
            except TimeoutError:
                pass
            removed = self.records.expire(self.now())
            if removed:
                self.counters["expired"] += len(removed)
                log.debug("%s: %d provider entries expired", self.host.name, len(removed))

    async def _refresh_buckets(self) -> None:
        period = max(1.0, self.refresh_interval / 4)
        while True:
            await asyncio.sleep(period)
            for index in self.table.buckets_needing_refresh(self.now(), self.refresh_interval):
                try:
                    await self.lookup(random_id_in_bucket(self.host.node_id, index), kind="refresh")
                except Exception:  # a refresh that failed is retried next period; the loop goes on
                    log.exception("%s: refreshing bucket %d failed", self.host.name, index)

    # ------------------------------------------------------ observability
    def snapshot(self) -> dict[str, Any]:
        now = self.now()
        return {
            "node": self.host.name,
            "routing_table": self.table.snapshot(now),
            "records": self.records.snapshot(now),
            "lookups": [r.__dict__ for r in list(self.lookups)[-50:]],
            "counters": dict(self.counters),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "contacts": len(self.table),
            "keys": len(self.records),
            **self.records.stats(),
            **self.counters,
        }


HEDGE_FLOOR = 0.001  # s: below this, widening a hedged read saves nothing


class RttEstimator:
    """Smoothed query round-trip time, giving the lookup's *soft* per-query timeout.

    As TCP's retransmission timer (RFC 6298): ``srtt + 4 * rttvar``, clamped to
    [floor, ceiling].  A lookup stops waiting for a peer slower than that and
    asks the next candidate, so one dead contact costs a few round trips instead
    of the full ``query_timeout`` (the hard limit of the request itself).
    """

    def __init__(self, *, ceiling: float, floor: float = 0.1):
        self.floor = min(floor, ceiling)
        self.ceiling = ceiling
        self.srtt: float | None = None
        self.rttvar = 0.0

    def sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def timeout(self) -> float:
        if self.srtt is None:
            return self.ceiling
        return min(self.ceiling, max(self.floor, self.srtt + 4 * self.rttvar))

    def hedge_delay(self) -> float:
        """How long a hedged read waits on its first query before asking alpha peers (~2 RTT)."""
        if self.srtt is None:
            return HEDGE_FLOOR * 5
        return min(self.timeout(), max(HEDGE_FLOOR, 2 * (self.srtt + self.rttvar)))


class _QueryFailed(MaculaError):
    code = "query_failed"


class _Wakeup:
    """Wakes a lookup when one of its queries ends or a deadline passes.

    Cheaper than ``asyncio.wait`` per round: queries call it directly when their
    reply arrives (the transport's ``notify``), so the lookup resumes one loop
    pass sooner, and no callbacks are added and removed on every future.
    """

    __slots__ = ("_waiter",)

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None

    def __call__(self, *_: Any) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, until: float | None) -> None:
        """Until called, or until loop time ``until`` (None: no deadline)."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = None if until is None else loop.call_at(until, self)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()


@dataclass(slots=True)
class _Query:
    """One lookup query in flight: a reply future (``direct``) or a task running _query()."""

    fut: asyncio.Future
    contact: Contact
    started: float
    direct: bool


def _keep_best(best: dict[bytes, ProviderEntry], entry: ProviderEntry) -> None:
    current = best.get(entry.node_id)
    if current is None or (entry.seq, entry.expires_at or 0) > (current.seq, current.expires_at or 0):
        best[entry.node_id] = entry


def provider_key(realm: str, service: str) -> bytes:
    """The DHT key of a service's provider record (realms never share keys)."""
    return service_key(realm, service)


