"""DHT benchmark: macula's DHT over QUIC against the ``kademlia`` package (bmuller), on loopback.

Run ``python bench/dht.py --help``.  For every network size N both systems run
the same scenario, one after the other, in one process and one asyncio loop
(the default loop, no uvloop):

``macula``
    N :class:`~macula_lab.runtime.node.Node` instances, each with its own QUIC endpoint
    and a certificate from one lab CA (TLS 1.3, peers verified), k=20, alpha=3
    and the product's default per-query timeouts.  A key is a provider key
    (``provider_key(realm, service)``), a value a ``ProviderEntry`` of the
    storing node; a lookup is ``node.dht.find(key)``.
``kademlia``
    N ``kademlia.network.Server`` instances (plain UDP datagrams, no
    authentication), ksize=20, alpha=3 and the package's default 5 s RPC
    timeout.  A lookup is ``server.get(key)``.

Scenario (the node indices, keys and lookups come from one seeded plan, so both
systems do exactly the same things):

1. **build** - start N nodes one after the other, each bootstrapping from the
   first (macula: ``Node(bootstrap=[first.endpoint]).start()``; kademlia:
   ``listen()`` + ``bootstrap([first])``); the build time is reported.
2. **store** - ``--keys`` keys, each from a random node, one after the other.
   macula's store returns at a quorum of replicas and finishes the rest in the
   background; the bench waits for that before the next phase.  Then
   **re-store**: the same stores again, as re-advertisement does before a
   record expires (macula: connections to the replicas are already open).
3. **lookup** - ``--lookups`` lookups, one after the other: a random node looks
   up a random stored key.  Success: the stored value comes back (macula: an
   entry of the storing provider with its metadata; kademlia: the same value).
4. **churn** - ``--churn`` (25 %) of the nodes are stopped silently (no goodbye:
   peers find out by timing out), then ``--churn-lookups`` lookups from
   survivors of the keys stored in step 2.  Before that the bench counts the
   keys that still have a replica on a live node, so a failed lookup can be
   told from a lost record.

Everything is sequential (one operation at a time): a latency is the time of
that operation alone.  Note that all N nodes share one process and one thread,
so a latency is the CPU time of every node the operation touched plus the
waiting (timeouts); on a real network that CPU work would be spread over hosts.

Exit status: 0 whether targets are met or not (this is a benchmark, not a
test); 1 if a scenario crashed or an operation raised (tracebacks on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import logging
import math
import os
import pstats
import random
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The harness shared by the benchmarks lives next to this file (_common.py).  Put this
# folder on sys.path so that `import _common` works however the script is started
# (python bench/dht.py, from inside bench/, or imported as a module).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # also makes macula_lab importable from a checkout that is not installed
from _common import log, percentile

from macula_lab.core.records import ProviderEntry
from macula_lab.errors import MaculaError
from macula_lab.runtime.dht import DEFAULT_QUERY_TIMEOUT, provider_key
from macula_lab.runtime.node import Node
from macula_lab.transport.certs import NodeCert, lab_certs
from macula_lab.transport.quic import TlsConfig

REALM = "com.bench.dht"
HOST = "127.0.0.1"
K = 20
ALPHA = 3
#: long enough that no record expires during a scenario, even a profiled one
RECORD_TTL = 3600.0
KADEMLIA_RPC_TIMEOUT = 5.0  # rpcudp's default wait_timeout (what kademlia.Server uses)

MACULA = "macula"
KADEMLIA = "kademlia"
MACULA_FLOOR = "macula-1req"  # diagnostic, not run by default: see MaculaOneRequest
ALL_SYSTEMS = (MACULA, KADEMLIA)
KNOWN_SYSTEMS = (*ALL_SYSTEMS, MACULA_FLOOR)


def service_name(key: int) -> str:
    return f"bench-svc-{key}"


# ====================================================================== plan
@dataclass(frozen=True)
class Plan:
    """What one scenario does, drawn from the seed (identical for both systems)."""

    n: int
    stores: list[tuple[int, int]]  # (storing node, key), key i stored i-th
    lookups: list[tuple[int, int]]  # (looking-up node, key)
    dead: list[int]  # nodes stopped silently before the churn phase
    churn_lookups: list[tuple[int, int]]  # (surviving node, key)

    @property
    def survivors(self) -> list[int]:
        dead = set(self.dead)
        return [i for i in range(self.n) if i not in dead]


def make_plan(n: int, args: argparse.Namespace, rnd: int) -> Plan:
    rng = random.Random(f"{args.seed}:{n}:{rnd}")
    stores = [(rng.randrange(n), key) for key in range(args.keys)]
    lookups = [(rng.randrange(n), rng.randrange(args.keys)) for _ in range(args.lookups)]
    dead = sorted(rng.sample(range(n), round(n * args.churn)))
    plan = Plan(n, stores, lookups, dead, [])
    survivors = plan.survivors
    churn = [(rng.choice(survivors), rng.randrange(args.keys)) for _ in range(args.churn_lookups)]
    return Plan(n, stores, lookups, dead, churn)


# =================================================================== systems
class DhtSystem(ABC):
    """One DHT under test: N nodes in this process, addressed by index 0..N-1."""

    name: str

    def __init__(self) -> None:
        self.phase = ""  # the phase being run: "store", "lookup" or "churn"

    @abstractmethod
    async def build(self, n: int) -> None:
        """Start ``n`` nodes in order; node i > 0 bootstraps from node 0."""

    @abstractmethod
    async def store(self, node: int, key: int) -> bool:
        """Store ``key``'s value from ``node``; True if at least one node took it."""

    @abstractmethod
    async def lookup(self, node: int, key: int) -> bool:
        """Look ``key`` up from ``node``; True if the stored value came back."""

    @abstractmethod
    def holds(self, node: int, key: int) -> bool:
        """Whether ``node`` itself stores ``key``'s value (checked before a lookup, untimed)."""

    @abstractmethod
    async def kill(self, node: int) -> None:
        """Stop ``node`` silently (no goodbye to anyone)."""

    @abstractmethod
    def has_live_replica(self, key: int, survivors: list[int]) -> bool:
        """Whether a surviving node still holds ``key``'s value."""

    async def settle(self) -> None:  # noqa: B027 (optional: most systems have nothing to wait for)
        """Wait for work a phase left running in the background (macula: the rest of each store)."""

    @abstractmethod
    async def stop_all(self) -> None:
        """Stop every node that is still running (idempotent, also after errors)."""

    def phase_started(self, phase: str) -> None:
        """Hook: a phase begins (systems reset their per-phase counters here)."""
        self.phase = phase

    def phase_done(self, phase: str, ops: int) -> dict[str, float]:
        """Hook: per-phase diagnostics (averages per operation)."""
        return {}


class MaculaSystem(DhtSystem):
    """macula_lab nodes over QUIC, TLS verified against the lab CA."""

    name = MACULA

    def __init__(self, certs: dict[str, NodeCert]):
        super().__init__()
        self.certs = certs
        self.nodes: list[Node] = []
        self.providers: dict[int, bytes] = {}  # key -> node id of the node that stored it
        self._stores: list[Any] = []  # StoreResults whose background half may still run
        self._sums: dict[str, float] = {}
        self._handshakes0 = 0

    @staticmethod
    def key_bytes(key: int) -> bytes:
        return provider_key(REALM, service_name(key))

    async def build(self, n: int) -> None:
        for i in range(n):
            name = f"node-{i + 1}"
            node = Node(
                name=name,
                realm=REALM,
                tls=TlsConfig.from_node_cert(self.certs[name]),
                k=K,
                alpha=ALPHA,
                bootstrap=[self.nodes[0].endpoint] if self.nodes else [],
            )
            self.nodes.append(node)  # before start(): stop_all() cleans up a half-started node
            await node.start()  # with bootstrap peers: joins by a self-lookup
            gc_checkpoint()

    async def store(self, node: int, key: int) -> bool:
        n = self.nodes[node]
        entry = ProviderEntry(n.node_id, n.endpoint, {"v": key}, RECORD_TTL, 1)
        res = await n.dht.store(self.key_bytes(key), entry)
        self.providers[key] = n.node_id
        self._add("replicas at return", res.count)
        self._stores.append(res)
        return res.count > 0

    async def settle(self) -> None:
        stores, self._stores = self._stores, []
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in stores)), 60)
        if stores:
            log(f"macula: {sum(r.count for r in stores) / len(stores):.1f} replicas per key when every STORE ended")

    async def lookup(self, node: int, key: int) -> bool:
        entries, result = await self.nodes[node].dht.find(self.key_bytes(key))
        self._add("hops", result.hops)
        self._add("contacted", result.contacted)
        self._add("failed queries", result.failures)
        provider = self.providers.get(key)
        return any(e.node_id == provider and e.metadata.get("v") == key for e in entries)

    def holds(self, node: int, key: int) -> bool:
        return bool(self.nodes[node].dht.get_local(self.key_bytes(key)))

    async def kill(self, node: int) -> None:
        await self.nodes[node].kill()

    def has_live_replica(self, key: int, survivors: list[int]) -> bool:
        kb = self.key_bytes(key)
        return any(self.nodes[i].dht.get_local(kb) for i in survivors)

    async def stop_all(self) -> None:
        for node in self.nodes:
            try:
                await node.stop()  # a no-op for killed nodes
            except Exception:  # keep stopping the others
                log(f"macula: stopping {node.name} failed:\n{traceback.format_exc()}")
        self.nodes = []

    # ---------------------------------------------------------- diagnostics
    def _add(self, what: str, value: float) -> None:
        self._sums[what] = self._sums.get(what, 0.0) + value

    def _handshakes(self) -> int:
        """Outgoing QUIC connections opened so far (all nodes, killed ones included)."""
        return sum(n.transport.counters["handshakes"] for n in self.nodes)

    def phase_started(self, phase: str) -> None:
        super().phase_started(phase)
        self._sums = {}
        self._handshakes0 = self._handshakes()

    def phase_done(self, phase: str, ops: int) -> dict[str, float]:
        out = {what: total / ops for what, total in self._sums.items()} if ops else {}
        if ops:
            out["new QUIC connections"] = (self._handshakes() - self._handshakes0) / ops
        return out


class _KademliaLogFilter(logging.Filter):
    """Counts kademlia's per-timeout log lines and drops them (hundreds under churn)."""

    NOISY = {
        "Did not receive reply": "rpc timeouts",  # rpcudp, ERROR, one per timed-out RPC
        "no response from": None,  # kademlia, WARNING, the same event seen by the router
        "received unknown message": "late replies",  # rpcudp, WARNING, a reply after its timeout
    }

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        for prefix, counter in self.NOISY.items():
            if msg.startswith(prefix):
                if counter is not None:
                    self.counts[counter] = self.counts.get(counter, 0) + 1
                return False
        return True


_KADEMLIA_LOG_FILTER: _KademliaLogFilter | None = None


def _kademlia_log_filter() -> _KademliaLogFilter:
    """Quieten kademlia's loggers (once per process) and return the counting filter."""
    global _KADEMLIA_LOG_FILTER
    if _KADEMLIA_LOG_FILTER is None:
        _KADEMLIA_LOG_FILTER = _KademliaLogFilter()
        for name in ("kademlia", "rpcudp"):
            logging.getLogger(name).setLevel(logging.WARNING)  # INFO/DEBUG: a line per RPC
        # a logger's filters only see its own records: attach to the modules that log them
        for name in ("kademlia.protocol", "rpcudp.protocol"):
            logging.getLogger(name).addFilter(_KADEMLIA_LOG_FILTER)
    return _KADEMLIA_LOG_FILTER


class KademliaSystem(DhtSystem):
    """bmuller's kademlia: asyncio UDP, no authentication."""

    name = KADEMLIA

    def __init__(self) -> None:
        super().__init__()
        from kademlia.network import Server  # imported lazily: an optional dependency ([bench])

        self.server_cls = Server
        self.servers: list[Any] = []
        self.log_filter = _kademlia_log_filter()
        self._counts0: dict[str, int] = {}

    @staticmethod
    def value(key: int) -> str:
        return f"value-{key}"

    async def build(self, n: int) -> None:
        first: tuple[str, int] | None = None
        for _ in range(n):
            server = self.server_cls(ksize=K, alpha=ALPHA)
            self.servers.append(server)
            await server.listen(0, interface=HOST)
            port = server.transport.get_extra_info("sockname")[1]
            if first is None:
                first = (HOST, port)
            else:
                await server.bootstrap([first])
            gc_checkpoint()

    async def store(self, node: int, key: int) -> bool:
        return bool(await self.servers[node].set(service_name(key), self.value(key)))

    async def lookup(self, node: int, key: int) -> bool:
        return await self.servers[node].get(service_name(key)) == self.value(key)

    def holds(self, node: int, key: int) -> bool:
        from kademlia.utils import digest

        return self.servers[node].storage.get(digest(service_name(key))) is not None

    async def kill(self, node: int) -> None:
        self.servers[node].stop()  # closes the socket: there is no goodbye in its protocol

    def has_live_replica(self, key: int, survivors: list[int]) -> bool:
        from kademlia.utils import digest

        dkey = digest(service_name(key))
        return any(self.servers[i].storage.get(dkey) is not None for i in survivors)

    async def stop_all(self) -> None:
        for server in self.servers:
            server.stop()  # idempotent
        self.servers = []

    def phase_started(self, phase: str) -> None:
        super().phase_started(phase)
        self._counts0 = dict(self.log_filter.counts)

    def phase_done(self, phase: str, ops: int) -> dict[str, float]:
        if not ops:
            return {}
        counts = self.log_filter.counts
        return {what: (counts.get(what, 0) - self._counts0.get(what, 0)) / ops for what in ("rpc timeouts",)}


class MaculaOneRequest(MaculaSystem):
    """Diagnostic floor: a "lookup" is one raw FIND_VALUE request to the closest contact holding the key.

    No lookup state machine, no hedging, no routing-table updates: what the
    transport alone costs.  If this row is already near kademlia's figure times
    the target ratio, the gap left is the QUIC request itself, not the DHT code.
    """

    name = MACULA_FLOOR

    async def lookup(self, node: int, key: int) -> bool:
        from macula_lab.core.messages import MessageType

        n, kb = self.nodes[node], self.key_bytes(key)
        if n.dht.get_local(kb):
            return True
        for contact in n.dht.table.closest(kb, 20):
            try:  # churn: a dead contact costs the product's hard query timeout, then the next one
                reply = await n.request(contact.endpoint, MessageType.FIND_VALUE, {"key": kb}, timeout=0.5)
            except MaculaError:
                continue
            if reply.body.get("value"):
                return True
        return False


def make_system(name: str, certs: dict[str, NodeCert]) -> DhtSystem:
    if name == MACULA:
        return MaculaSystem(certs)
    if name == MACULA_FLOOR:
        return MaculaOneRequest(certs)
    if name == KADEMLIA:
        return KademliaSystem()
    raise ValueError(f"unknown system {name!r}")


# ========================================================= garbage collection
# N nodes in one process make one large heap, and CPython's full (generation 2)
# collections scan all of it: with 200 QUIC nodes a pause reaches a second or
# more, growing as the heap grows.  That stalls every node at once - spurious
# timeouts a real deployment (one process per node) never sees.  So, for both
# systems alike, everything alive after each operation is moved to the permanent
# generation (gc.freeze(), O(1)), and later collections only scan what is new.
# Reference counting still frees everything that is not in a cycle; the frozen
# cycles are collected at the end of the scenario.  --no-gc-freeze turns it off.
_GC_FREEZE = True


def gc_checkpoint() -> None:
    if _GC_FREEZE:
        gc.freeze()


def gc_release() -> None:
    gc.unfreeze()
    gc.collect()


# =============================================================== measurement
@dataclass
class Phase:
    """The operations of one phase: latencies (ms) and outcomes."""

    ops: int = 0
    ok: int = 0
    errors: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    # lookups only: how many were asked by a node that holds the key itself (kademlia's
    # get() then answers from local storage without a network lookup; macula's find()
    # still asks the k closest nodes), and the latency of the others
    local: int = 0
    remote_p50_ms: float = math.nan
    remote_p99_ms: float = math.nan
    diag: dict[str, float] = field(default_factory=dict)

    @property
    def success(self) -> float:
        return self.ok / self.ops if self.ops else math.nan


@dataclass
class Scenario:
    """One system at one N in one round."""

    system: str
    n: int
    round: int
    build_s: float = math.nan
    store: Phase = field(default_factory=Phase)
    restore: Phase = field(default_factory=Phase)
    lookup: Phase = field(default_factory=Phase)
    churn: Phase = field(default_factory=Phase)
    dead: int = 0
    keys: int = 0
    keys_alive: int = 0  # keys with a replica on a surviving node when churn lookups start
    error: str | None = None


async def run_phase(
    system: DhtSystem,
    phase: str,
    ops: list[tuple[int, int]],
    fn: Callable[[int, int], Awaitable[bool]],
    profile: cProfile.Profile | None = None,
) -> Phase:
    """Run ``fn(a, b)`` for every pair of ``ops`` one after the other, timing each."""
    out = Phase()
    latencies: list[float] = []
    remote: list[float] = []  # lookups by a node that does not hold the key
    cpu = 0.0  # process CPU time spent during the operations (every node's work, all threads)
    system.phase_started(phase)
    clock = time.perf_counter
    for a, b in ops:
        local = phase not in ("store", "restore") and system.holds(a, b)
        if profile is not None:
            profile.enable()
        t0, c0 = clock(), time.process_time()
        try:
            ok = await fn(a, b)
        except Exception:
            ok = False
            out.errors += 1
            if out.errors == 1:  # the first one in full; they are counted in the report
                log(f"{system.name} {phase}: operation raised:\n{traceback.format_exc()}")
        latencies.append((clock() - t0) * 1000)
        cpu += time.process_time() - c0
        if profile is not None:
            profile.disable()
        if local:
            out.local += 1
        else:
            remote.append(latencies[-1])
        out.ops += 1
        out.ok += bool(ok)
        gc_checkpoint()
    latencies.sort()
    out.p50_ms, out.p99_ms = percentile(latencies, 50), percentile(latencies, 99)
    out.max_ms = latencies[-1] if latencies else math.nan
    if phase not in ("store", "restore"):
        remote.sort()
        out.remote_p50_ms, out.remote_p99_ms = percentile(remote, 50), percentile(remote, 99)
    out.diag = {"ms CPU": 1000 * cpu / out.ops} if out.ops else {}
    out.diag.update(system.phase_done(phase, out.ops))
    return out


async def run_scenario(system: DhtSystem, plan: Plan, args: argparse.Namespace, res: Scenario) -> None:
    """Build, store, look up, kill a quarter, look up again; figures go into ``res``."""
    tag = f"[{system.name} N={plan.n} round {res.round}]"
    t0 = time.perf_counter()
    await system.build(plan.n)
    res.build_s = time.perf_counter() - t0
    log(f"{tag} built in {res.build_s:.1f} s")
    await asyncio.sleep(args.settle)  # let join-time background work (pings, handovers) finish

    res.store = await run_phase(system, "store", plan.stores, system.store)
    log(f"{tag} {len(plan.stores)} stores: p50 {res.store.p50_ms:.1f} ms, p99 {res.store.p99_ms:.1f} ms")
    await system.settle()
    await asyncio.sleep(args.settle)
    res.restore = await run_phase(system, "restore", plan.stores, system.store)
    log(f"{tag} {len(plan.stores)} re-stores: p50 {res.restore.p50_ms:.1f} ms, p99 {res.restore.p99_ms:.1f} ms")
    await system.settle()
    await asyncio.sleep(args.settle)

    res.lookup = await run_phase(system, "lookup", plan.lookups, system.lookup)
    log(
        f"{tag} {len(plan.lookups)} lookups: p50 {res.lookup.p50_ms:.1f} ms, p99 {res.lookup.p99_ms:.1f} ms, "
        f"success {res.lookup.ok}/{res.lookup.ops}"
    )

    for node in plan.dead:
        await system.kill(node)
    survivors = plan.survivors
    res.dead, res.keys = len(plan.dead), len(plan.stores)
    res.keys_alive = sum(system.has_live_replica(key, survivors) for _, key in plan.stores)
    log(f"{tag} stopped {res.dead} nodes silently; {res.keys_alive}/{res.keys} keys have a live replica")

    profile = cProfile.Profile() if args.profile and isinstance(system, MaculaSystem) else None
    res.churn = await run_phase(system, "churn", plan.churn_lookups, system.lookup, profile)
    log(
        f"{tag} {len(plan.churn_lookups)} churn lookups: p50 {res.churn.p50_ms:.1f} ms, "
        f"p99 {res.churn.p99_ms:.1f} ms, success {res.churn.ok}/{res.churn.ops}"
    )
    if profile is not None:
        buf = io.StringIO()
        pstats.Stats(profile, stream=buf).sort_stats(os.environ.get("PSORT", "tottime")).print_stats(
            *([os.environ["PFILTER"]] if os.environ.get("PFILTER") else []), int(os.environ.get("PTOP", "25"))
        )
        log(f"{tag} profile of the churn lookups (cProfile, by own time):\n{buf.getvalue()}")


async def run_all(args: argparse.Namespace) -> list[Scenario]:
    results: list[Scenario] = []
    with tempfile.TemporaryDirectory(prefix="macula-bench-dht-") as tmp:
        names = [f"node-{i}" for i in range(1, max(args.size_list) + 1)]
        certs = lab_certs(tmp, names, ips=["127.0.0.1"]) if MACULA in args.system_list else {}
        for n in args.size_list:
            for rnd in range(1, args.rounds_for[n] + 1):
                plan = make_plan(n, args, rnd)
                for name in args.system_list:
                    res = Scenario(name, n, rnd)
                    results.append(res)
                    system = make_system(name, certs)
                    t0 = time.perf_counter()
                    try:
                        async with asyncio.timeout(args.timeout):
                            await run_scenario(system, plan, args, res)
                    except Exception as exc:  # includes TimeoutError: a hung scenario
                        res.error = _common.crashed(exc, args.timeout, f"[{name} N={n} round {rnd}]")
                    finally:
                        # every node stops, also after an error, so the next scenario starts clean
                        t1 = time.perf_counter()
                        await system.stop_all()
                        await asyncio.sleep(0.5)  # let closes and cancelled tasks drain
                        gc_release()
                        log(f"[{name} N={n} round {rnd}] teardown {time.perf_counter() - t1:.1f} s")
                    log(f"[{name} N={n} round {rnd}] done in {time.perf_counter() - t0:.1f} s")
    return results


# ==================================================================== report
@dataclass
class Summary:
    """The median over rounds of every figure of one (system, N)."""

    system: str
    n: int
    figures: dict[str, float]
    diag: dict[str, dict[str, float]]
    errors: int
    crashed: bool


FIGURES = {
    "build_s": lambda r: r.build_s,
    "store_p50_ms": lambda r: r.store.p50_ms,
    "store_p99_ms": lambda r: r.store.p99_ms,
    "store_success": lambda r: r.store.success,
    "restore_p50_ms": lambda r: r.restore.p50_ms,
    "restore_p99_ms": lambda r: r.restore.p99_ms,
    "lookup_p50_ms": lambda r: r.lookup.p50_ms,
    "lookup_p99_ms": lambda r: r.lookup.p99_ms,
    "lookup_success": lambda r: r.lookup.success,
    "churn_p50_ms": lambda r: r.churn.p50_ms,
    "churn_p99_ms": lambda r: r.churn.p99_ms,
    "churn_success": lambda r: r.churn.success,
    "lookup_local": lambda r: r.lookup.local,
    "lookup_remote_p50_ms": lambda r: r.lookup.remote_p50_ms,
    "lookup_remote_p99_ms": lambda r: r.lookup.remote_p99_ms,
    "churn_local": lambda r: r.churn.local,
    "churn_remote_p50_ms": lambda r: r.churn.remote_p50_ms,
    "churn_remote_p99_ms": lambda r: r.churn.remote_p99_ms,
    "keys_alive": lambda r: r.keys_alive,
    "keys": lambda r: r.keys,
    "dead": lambda r: r.dead,
}


def summarize(results: list[Scenario], args: argparse.Namespace) -> list[Summary]:
    out = []
    for n in args.size_list:
        for name in args.system_list:
            rows = [r for r in results if r.system == name and r.n == n]
            good = [r for r in rows if r.error is None]
            figures = {fig: _common.median([get(r) for r in good]) for fig, get in FIGURES.items()}
            diag: dict[str, dict[str, float]] = {}
            for phase in ("store", "restore", "lookup", "churn"):
                keys = dict.fromkeys(k for r in good for k in getattr(r, phase).diag)  # ordered
                diag[phase] = {
                    k: _common.median([getattr(r, phase).diag.get(k, math.nan) for r in good]) for k in keys
                }
            errors = sum(r.store.errors + r.restore.errors + r.lookup.errors + r.churn.errors for r in rows)
            out.append(Summary(name, n, figures, diag, errors, crashed=not good))
    return out


@dataclass
class Check:
    label: str
    shown: str
    target: str
    verdict: str  # PASS / MISS / info / n/a


def checks(summaries: list[Summary], args: argparse.Namespace) -> list[Check]:
    by = {(s.system, s.n): s for s in summaries}
    out: list[Check] = []

    def fig(system: str, n: int, name: str) -> float:
        s = by.get((system, n))
        return math.nan if s is None else s.figures[name]

    def pct(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{100 * v:.1f}%"

    if MACULA in args.system_list:
        for phase, what in (("lookup", "lookup success"), ("churn", "churn lookup success")):
            for n in args.size_list:
                v = fig(MACULA, n, f"{phase}_success")
                out.append(Check(f"macula {what}, N={n}", pct(v), "100%", _common.verdict(v, v == 1.0)))
        for n in args.size_list:
            alive, keys = fig(MACULA, n, "keys_alive"), fig(MACULA, n, "keys")
            shown = "n/a" if math.isnan(alive) else f"{alive:.0f}/{keys:.0f}"
            out.append(Check(f"macula keys with a live replica after churn, N={n}", shown, "-", "info"))
    if MACULA in args.system_list and KADEMLIA in args.system_list:
        n = args.size_list[0]  # the smallest size: 60 by default
        for label, metric, target in (
            ("mesh build time", "build_s", 3.0),
            ("store p50", "store_p50_ms", 1.5),
            ("re-store p50", "restore_p50_ms", 1.5),
        ):
            v = fig(MACULA, n, metric) / fig(KADEMLIA, n, metric)
            shown = "n/a" if math.isnan(v) else f"{v:.2f}x"
            out.append(Check(f"macula {label} / kademlia, N={n}", shown, f"<= {target}x", _common.verdict(v, v <= target)))
        v = fig(MACULA, n, "lookup_p50_ms") / fig(KADEMLIA, n, "lookup_p50_ms")
        shown = "n/a" if math.isnan(v) else f"{v:.2f}x"
        out.append(
            Check(
                f"macula lookup p50 / kademlia lookup p50, N={n}",
                shown,
                "<= 2.0x",
                _common.verdict(v, v <= 2.0),
            )
        )
        # the same without the lookups answered from the asking node's own storage (only
        # kademlia short-cuts those), so that network lookups are compared with each other
        v = fig(MACULA, n, "lookup_remote_p50_ms") / fig(KADEMLIA, n, "lookup_remote_p50_ms")
        shown = "n/a" if math.isnan(v) else f"{v:.2f}x"
        out.append(Check(f"  the same, lookups by nodes not holding the key, N={n}", shown, "-", "info"))
    if MACULA_FLOOR in args.system_list and KADEMLIA in args.system_list:
        n = args.size_list[0]
        for metric, label in (("lookup_p50_ms", ""), ("lookup_remote_p50_ms", ", not holding the key")):
            v = fig(MACULA_FLOOR, n, metric) / fig(KADEMLIA, n, metric)
            shown = "n/a" if math.isnan(v) else f"{v:.2f}x"
            out.append(
                Check(f"{MACULA_FLOOR} (one raw request) / kademlia p50{label}, N={n}", shown, "-", "info")
            )
    for n in args.size_list:
        if MACULA in args.system_list:
            v = fig(MACULA, n, "churn_p99_ms")
            shown = "n/a" if math.isnan(v) else f"{v:.0f} ms"
            out.append(
                Check(f"macula churn lookup p99, N={n}", shown, "<= 1000 ms", _common.verdict(v, v <= 1000))
            )
        if KADEMLIA in args.system_list:
            v = fig(KADEMLIA, n, "churn_p99_ms")
            shown = "n/a" if math.isnan(v) else f"{v:.0f} ms"
            out.append(Check(f"kademlia churn lookup p99, N={n} (reference)", shown, "-", "info"))
    return out


def macula_revision() -> str:
    """The git commit of the macula_lab tree, "+dirty" if it has local changes; "" outside git."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "--no-optional-locks", "-C", str(root)]  # read-only: never touches the index
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return ""
        dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "macula_lab"], timeout=10).returncode
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty else "")


def report(summaries: list[Summary], cs: list[Check], env: dict[str, Any], args: argparse.Namespace) -> str:
    def ms(s: Summary, a: str, b: str) -> str:
        x, y = s.figures[a], s.figures[b]
        return "n/a" if math.isnan(x) else f"{x:.1f} / {y:.1f}"

    def pct(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{100 * v:.1f}%"

    lines = [
        _common.environment_line(
            env,
            [
                "aioquic",
                f"kademlia {env['kademlia']} (rpcudp {env['rpcudp']})",
                "msgpack",
                f"macula_lab {env['macula_lab'] or 'unknown revision'}",
            ],
        ),
        f"workload: N in {args.size_list}, {args.keys} keys stored, {args.lookups} lookups, then "
        f"{round(100 * args.churn)}% of the nodes stopped silently and {args.churn_lookups} lookups from "
        f"survivors; k={K}, alpha={ALPHA}; seed {args.seed}; one operation at a time; "
        "median of " + ", ".join(f"{r} round(s) at N={n}" for n, r in args.rounds_for.items()),
        f"note: macula = QUIC + TLS 1.3, certificates verified against a lab CA, per-query timeout "
        f"{DEFAULT_QUERY_TIMEOUT:g} s (product default); kademlia = plain UDP, no authentication, "
        f"RPC timeout {KADEMLIA_RPC_TIMEOUT:g} s (package default).  All N nodes share one process and "
        "one thread: a latency includes the CPU time of every node the operation touched.  "
        f"gc: {'frozen after every operation (see README)' if _GC_FREEZE else 'default (--no-gc-freeze)'}",
        "",
    ]
    header = [
        "system",
        "N",
        "build s",
        "store p50/p99 ms",
        "re-store p50/p99 ms",
        "lookup p50/p99 ms",
        "success",
        "churn lookup p50/p99 ms",
        "churn success",
        "keys w/ live replica",
    ]
    rows = []
    for s in summaries:
        if s.crashed:
            rows.append([s.system, str(s.n), "CRASHED"] + [""] * (len(header) - 3))
            continue
        f = s.figures
        rows.append(
            [
                s.system,
                str(s.n),
                f"{f['build_s']:.1f}",
                ms(s, "store_p50_ms", "store_p99_ms"),
                ms(s, "restore_p50_ms", "restore_p99_ms"),
                ms(s, "lookup_p50_ms", "lookup_p99_ms"),
                pct(f["lookup_success"]),
                ms(s, "churn_p50_ms", "churn_p99_ms"),
                pct(f["churn_success"]),
                f"{f['keys_alive']:.0f}/{f['keys']:.0f}",
            ]
        )
    lines += _common.table(header, rows)
    lines.append("")
    lines += _common.verdict_lines(((c.label, c.shown, c.target, c.verdict) for c in cs), target_width=20)
    lines.append("")
    lines.append("details (per operation, median over rounds):")
    for s in summaries:
        parts = []
        for phase in ("store", "restore", "lookup", "churn"):
            items = [f"{v:.1f} {k}" for k, v in (s.diag.get(phase) or {}).items()]
            if phase not in ("store", "restore") and not math.isnan(s.figures[f"{phase}_local"]):
                f = s.figures
                items.append(
                    f"{f[f'{phase}_local']:.0f} asked by a node holding the key, the others "
                    f"p50/p99 {f[f'{phase}_remote_p50_ms']:.1f} / {f[f'{phase}_remote_p99_ms']:.1f} ms"
                )
            if items:
                parts.append(f"{phase}: " + ", ".join(items))
        if s.errors:
            parts.append(f"{s.errors} operations raised (see stderr)")
        if parts:
            lines.append(f"  {s.system} N={s.n}: " + "; ".join(parts))
    return "\n".join(lines)


def write_json(
    path: str,
    results: list[Scenario],
    summaries: list[Summary],
    cs: list[Check],
    env: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    doc = {
        "environment": env,
        "config": {
            "sizes": args.size_list,
            "systems": args.system_list,
            **{k: getattr(args, k) for k in ("keys", "lookups", "churn_lookups", "churn", "seed", "quick")},
            "rounds": {str(n): r for n, r in args.rounds_for.items()},
            "k": K,
            "alpha": ALPHA,
            "gc_freeze": _GC_FREEZE,
            "macula_query_timeout_s": DEFAULT_QUERY_TIMEOUT,
            "kademlia_rpc_timeout_s": KADEMLIA_RPC_TIMEOUT,
        },
        "summary": [asdict(s) for s in summaries],
        "rounds": [asdict(r) for r in results],
        "checks": [asdict(c) for c in cs],
    }
    _common.write_json(path, doc)


# ======================================================================= CLI
def raise_fd_limit() -> None:
    """Every outgoing QUIC connection has its own UDP socket: allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log(f"cannot raise the open-files limit from {soft} to {target}: {exc}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _common.parser(__doc__)
    p.add_argument(
        "--sizes", default=None, help="comma-separated network sizes (default 60,200; --quick: 30)"
    )
    p.add_argument("--keys", type=int, default=None, help="keys stored (default 50; --quick: 10)")
    p.add_argument(
        "--lookups", type=int, default=None, help="lookups before churn (default 200; --quick: 40)"
    )
    p.add_argument(
        "--churn-lookups",
        type=int,
        default=None,
        help="lookups after churn (default 60; --quick: 15); kademlia waits 5 s per dead contact",
    )
    p.add_argument(
        "--churn", type=float, default=0.25, help="fraction of nodes stopped silently (default 0.25)"
    )
    p.add_argument(
        "--seed", type=int, default=1, help="seed of the plan: who stores / looks up what (default 1)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="repetitions at every N; the median is reported (default: 3 at the smallest N, whose "
        "lookup p50 ratio is the target, so that one noisy episode cannot decide it; 1 at the "
        "others; --quick: 1)",
    )
    p.add_argument(
        "--settle", type=float, default=1.0, help="pause after the build and the stores (s, default 1)"
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="give up on a scenario after this many seconds"
    )
    p.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help=f"comma-separated systems to run (default: {','.join(ALL_SYSTEMS)}; "
        f"{MACULA_FLOOR}: one raw request per lookup, the transport's floor)",
    )
    p.add_argument(
        "--no-gc-freeze", action="store_true", help="leave the garbage collector alone (see README)"
    )
    p.add_argument(
        "--profile", action="store_true", help="cProfile macula's churn lookups; the top 25 go to stderr"
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run (under a minute)")
    _common.add_json_option(p)
    args = p.parse_args(argv)
    args.sizes = args.sizes or ("30" if args.quick else "60,200")
    _common.quick_defaults(args, keys=(50, 10), lookups=(200, 40), churn_lookups=(60, 15))
    try:
        args.size_list = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not args.size_list or min(args.size_list) < 2:
        p.error("--sizes: every size must be >= 2")
    if args.rounds is None:
        args.rounds_for = {n: 3 if n == args.size_list[0] and not args.quick else 1 for n in args.size_list}
    else:
        args.rounds_for = {n: args.rounds for n in args.size_list}
    _common.require_positive(p, args, "keys")
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.lookups < 0 or args.churn_lookups < 0 or args.settle < 0:
        p.error("--lookups, --churn-lookups and --settle must be >= 0")
    if not 0 <= args.churn < 1:
        p.error("--churn must be in [0, 1)")
    args.system_list = _common.system_list(p, args.systems, KNOWN_SYSTEMS, allow_empty=False)
    return args


def main(argv: list[str] | None = None) -> int:
    global _GC_FREEZE
    args = parse_args(argv)
    _GC_FREEZE = not args.no_gc_freeze
    raise_fd_limit()
    env = _common.environment(
        "aioquic",
        "kademlia",
        "rpcudp",
        "msgpack",
        nofile_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        macula_lab=macula_revision(),
    )
    results = _common.run_timed(run_all(args))
    summaries = summarize(results, args)
    cs = checks(summaries, args)
    print(report(summaries, cs, env, args))
    if args.json:
        write_json(args.json, results, summaries, cs, env, args)
        log(f"wrote {args.json}")
    failed = any(r.error is not None for r in results) or any(s.errors for s in summaries)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
