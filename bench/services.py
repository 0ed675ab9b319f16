"""Service-layer benchmark: ``Node.call`` on a discovery-cache hit against a bare request.

Run ``python bench/services.py --help``.  Two :class:`~macula_lab.node.Node`\\ s on
loopback QUIC (TLS 1.3, certificates verified), in one process, on the default
asyncio loop (no uvloop).  Node ``a`` calls node ``b`` two ways, in the same run
and over the same pooled connection:

``bare request``
    The foundations benchmark's request, at the node level:
    ``a.request(b.endpoint, MessageType.CALL, {"procedure": "bench.echo", "args": payload})``
    answered by ``b.procedure("bench.echo", lambda args, peer: args)``.
``service call (cache hit)``
    ``await a.call("bench.svc", payload)`` answered by
    ``await b.advertise("bench.svc", lambda args: args)``: discovery-cache lookup,
    provider selection, per-provider statistics, failover bookkeeping, the
    ``called`` event and the same CALL request underneath.  The cache is warmed
    before measuring and every measured call is checked to be a hit.

Both handlers are plain functions, so ``b`` answers within the loop pass that
received the request (no task) in both cases: the difference is the service
layer's own cost on the caller's side.

For each: warm-up, then (a) sequential latency, N calls one at a time
(p50/p99), and (b) throughput, N calls with ``--inflight`` outstanding.  Every
measurement is repeated ``--rounds`` times with fresh nodes (the order of the
two alternates between rounds) and the median across rounds is reported.  The
overhead of the service layer is ``call p50 / bare p50 - 1`` and
``bare throughput / call throughput - 1`` (extra time per call); the target is
at most 15 %.

Exit status: 0 whether the target is met or not (a benchmark, not a test); 1 if
a measurement crashed (its traceback goes to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

try:  # a checkout that is not pip-installed: import the package from the tree
    import macula_lab  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from macula_lab.certs import NodeCert, lab_certs
from macula_lab.core.messages import MessageType
from macula_lab.node import Node
from macula_lab.transport.quic import TlsConfig

PROCEDURE = "bench.echo"
SERVICE = "bench.svc"
REALM = "bench.realm"
BARE = "bare request"
CALL = "service call (cache hit)"
ALL_SYSTEMS = (BARE, CALL)
NAME_WIDTH = max(map(len, ALL_SYSTEMS))
TARGET_OVERHEAD = 0.15


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays a clean report."""
    print(msg, file=sys.stderr, flush=True)


# ====================================================================== setup
class Pair:
    """Node ``b`` serving both the bare procedure and the advertised service; ``a`` calling."""

    def __init__(self, payload: bytes, certs: dict[str, NodeCert]):
        self.payload = payload
        self.certs = certs
        self.a: Node | None = None
        self.b: Node | None = None

    def _node(self, name: str, **kw: Any) -> Node:
        # cache_ttl: the measured calls must all be cache hits, however long a round takes
        return Node(
            name=name, realm=REALM, tls=TlsConfig.from_node_cert(self.certs[name]), cache_ttl=3600, **kw
        )

    async def start(self) -> None:
        self.b = await self._node("b").start()
        self.a = await self._node("a", bootstrap=[self.b.endpoint]).start()
        self.b.procedure(PROCEDURE, lambda args, peer: args)
        await self.b.advertise(SERVICE, lambda args: args)
        providers = await self.a.discover(SERVICE)  # warms a's discovery cache
        if [p.node_id for p in providers] != [self.b.node_id]:
            raise AssertionError(f"a discovered {providers!r}, expected b only")

    async def bare(self) -> Any:
        assert self.a is not None and self.b is not None
        # a fresh body each time: request() stores the request id in it
        reply = await self.a.request(
            self.b.endpoint, MessageType.CALL, {"procedure": PROCEDURE, "args": self.payload}
        )
        return reply.body["result"]

    async def call(self) -> Any:
        assert self.a is not None
        return await self.a.call(SERVICE, self.payload)

    def misses(self) -> int:
        assert self.a is not None
        return self.a.services.cache.stats()["misses"]

    async def stop(self) -> None:
        for node in (self.a, self.b):
            if node is not None:
                await node.stop()
        self.a = self.b = None


# ================================================================= measurement
@dataclass
class RoundResult:
    seq_p50_us: float
    seq_p99_us: float
    throughput_rps: float


@dataclass
class SystemResult:
    name: str
    rounds: list[RoundResult] = field(default_factory=list)
    error: str | None = None

    def median(self, metric: str) -> float:
        values = [getattr(r, metric) for r in self.rounds]
        return statistics.median(values) if values else math.nan


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def sequential(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    """Latencies (µs) of ``n`` calls made one after the other."""
    clock = time.perf_counter_ns
    out: list[float] = []
    for _ in range(n):
        t0 = clock()
        await call()
        out.append((clock() - t0) / 1000)
    return out


async def concurrent(call: Callable[[], Awaitable[Any]], n: int, inflight: int) -> float:
    """Calls per second for ``n`` calls with ``inflight`` workers keeping one call outstanding each."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(inflight, n))))
    return n / (time.perf_counter() - t0)


async def measure(call: Callable[[], Awaitable[Any]], args: argparse.Namespace) -> RoundResult:
    # warm-up both patterns: stream credit, caches, allocator
    await sequential(call, args.warmup)
    await concurrent(call, args.warmup, args.inflight)
    gc.collect()
    latencies = sorted(await sequential(call, args.requests))
    gc.collect()
    rps = await concurrent(call, args.requests, args.inflight)
    return RoundResult(percentile(latencies, 50), percentile(latencies, 99), rps)


async def run_all(args: argparse.Namespace) -> dict[str, SystemResult]:
    payload = os.urandom(args.payload)
    results = {name: SystemResult(name) for name in args.system_list}
    with tempfile.TemporaryDirectory(prefix="macula-bench-") as tmp:
        certs = lab_certs(tmp, ["a", "b"])
        for rnd in range(1, args.rounds + 1):
            # alternate the order so that drift within a round hits both alike
            order = args.system_list if rnd % 2 else list(reversed(args.system_list))
            pair = Pair(payload, certs)
            try:
                async with asyncio.timeout(args.timeout):
                    await pair.start()
            except Exception as exc:
                for res in results.values():
                    res.error = res.error or f"setup: {type(exc).__name__}: {exc}"
                log(f"[round {rnd}/{args.rounds}] setup CRASHED\n{traceback.format_exc()}")
                await pair.stop()
                break
            try:
                for name in order:
                    res = results[name]
                    if res.error is not None:
                        continue  # crashed in an earlier round: do not retry
                    call = pair.bare if name == BARE else pair.call
                    t0 = time.perf_counter()
                    try:
                        async with asyncio.timeout(args.timeout):
                            if await call() != payload:
                                raise AssertionError(f"{name}: the reply is not an echo of the payload")
                            misses = pair.misses()
                            r = await measure(call, args)
                            if name == CALL and pair.misses() != misses:
                                raise AssertionError(
                                    f"{pair.misses() - misses} measured calls missed the discovery cache"
                                )
                    except Exception as exc:  # includes TimeoutError: a hung measurement
                        detail = str(exc) or f"no result within {args.timeout:g} s"
                        res.error = f"{type(exc).__name__}: {detail}"
                        log(f"[round {rnd}/{args.rounds}] {name}: CRASHED\n{traceback.format_exc()}")
                        continue
                    res.rounds.append(r)
                    log(
                        f"[round {rnd}/{args.rounds}] {name:<{NAME_WIDTH}} seq p50 {r.seq_p50_us:8.1f} µs  "
                        f"p99 {r.seq_p99_us:8.1f} µs  {r.throughput_rps:9.1f} req/s  "
                        f"({time.perf_counter() - t0:.1f} s)"
                    )
            finally:
                await pair.stop()
                await asyncio.sleep(0.05)  # let close frames and cancelled tasks drain
    return results


# ====================================================================== report
def environment() -> dict[str, Any]:
    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "aioquic": ver("aioquic"),
        "msgpack": ver("msgpack"),
        "cpu_count": os.cpu_count(),
        "event_loop": type(asyncio.get_event_loop_policy()).__name__,
    }


@dataclass
class Overhead:
    label: str
    value: float  # fraction: 0.10 is 10 % more time per call
    target: str
    verdict: str  # PASS / MISS / info / n/a


def overheads(results: dict[str, SystemResult]) -> list[Overhead]:
    """Extra time per call of the service layer, judged for p50 and throughput; p99 for information."""
    if BARE not in results or CALL not in results:
        return []
    bare, call = results[BARE], results[CALL]
    rows = [
        ("seq p50", call.median("seq_p50_us") / bare.median("seq_p50_us") - 1, True),
        ("throughput", bare.median("throughput_rps") / call.median("throughput_rps") - 1, True),
        ("seq p99", call.median("seq_p99_us") / bare.median("seq_p99_us") - 1, False),
    ]
    out = []
    for what, value, judged in rows:
        if math.isnan(value):
            verdict = "n/a"
        elif not judged:
            verdict = "info"
        else:
            verdict = "PASS" if value <= TARGET_OVERHEAD else "MISS"
        out.append(Overhead(f"service layer overhead, {what}", value, f"<= {TARGET_OVERHEAD:.0%}", verdict))
    return out


def report(
    results: dict[str, SystemResult], rows: list[Overhead], env: dict[str, Any], args: argparse.Namespace
) -> str:
    lines = [
        f"environment: Python {env['python']} ({env['implementation']}), aioquic {env['aioquic']}, "
        f"msgpack {env['msgpack']}, {env['cpu_count']} CPUs, {env['event_loop']} (no uvloop), "
        f"{env['platform']}",
        f"workload: {args.payload}-byte payload, {args.requests} calls per measurement, "
        f"{args.inflight} in flight for throughput, {args.warmup} warm-up, median of {args.rounds} round(s)",
        "note: two Nodes on loopback QUIC, TLS 1.3 with certificate verification; "
        "both handlers are plain functions answered without a task",
        "",
        f"| {'system':<{NAME_WIDTH}} | {'seq p50 µs':>10} | {'seq p99 µs':>10} | {'throughput req/s':>16} |",
        f"|{'-' * (NAME_WIDTH + 2)}|{'-' * 11}:|{'-' * 11}:|{'-' * 17}:|",
    ]
    for res in results.values():
        if res.error is not None and not res.rounds:
            lines.append(f"| {res.name:<{NAME_WIDTH}} | {'CRASHED':>10} | {'':>10} | {'':>16} |")
            continue
        lines.append(
            f"| {res.name:<{NAME_WIDTH}} | {res.median('seq_p50_us'):>10.1f} | {res.median('seq_p99_us'):>10.1f} "
            f"| {res.median('throughput_rps'):>16.1f} |"
        )
    lines.append("")
    width = max((len(r.label) for r in rows), default=0)
    for r in rows:
        shown = "    n/a" if math.isnan(r.value) else f"{r.value:+7.1%}"
        lines.append(f"{r.label:<{width}}  {shown}  (target {r.target})  {r.verdict}")
    return "\n".join(lines)


def write_json(
    path: str,
    results: dict[str, SystemResult],
    rows: list[Overhead],
    env: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    doc = {
        "environment": env,
        "config": {
            k: getattr(args, k) for k in ("requests", "inflight", "payload", "warmup", "rounds", "quick")
        },
        "results": {
            name: {
                "seq_p50_us": res.median("seq_p50_us"),
                "seq_p99_us": res.median("seq_p99_us"),
                "throughput_rps": res.median("throughput_rps"),
                "rounds": [asdict(r) for r in res.rounds],
                "error": res.error,
            }
            for name, res in results.items()
        },
        "overheads": [asdict(r) for r in rows],
    }
    Path(path).write_text(json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")


def _json_safe(value: Any) -> Any:
    """NaN (a figure of a crashed measurement) is not JSON: it becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ========================================================================= CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--requests",
        "-n",
        type=int,
        default=None,
        help="calls per measurement (default 2000; 1000 with --quick)",
    )
    p.add_argument(
        "--inflight", type=int, default=64, help="concurrent calls in the throughput test (default 64)"
    )
    p.add_argument("--payload", type=int, default=64, help="payload size in bytes (default 64)")
    p.add_argument(
        "--warmup", type=int, default=None, help="warm-up calls per pattern (default 200; 100 with --quick)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="repetitions; the median is reported (default 5; 1 with --quick)",
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="give up on a measurement after this many seconds"
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run (a few seconds)")
    p.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help=f"comma-separated subset to run, e.g. for profiling one side (default: {', '.join(ALL_SYSTEMS)})",
    )
    p.add_argument("--json", metavar="PATH", help="also write all figures to this JSON file")
    args = p.parse_args(argv)
    quick = args.quick
    args.requests = args.requests if args.requests is not None else (1000 if quick else 2000)
    args.warmup = args.warmup if args.warmup is not None else (100 if quick else 200)
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 5)
    for opt in ("requests", "inflight", "rounds"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt} must be >= 1")
    if args.payload < 0 or args.warmup < 0:
        p.error("--payload and --warmup must be >= 0")
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.system_list if s not in ALL_SYSTEMS]
    if unknown:
        p.error(f"unknown system(s) {unknown}; choose from {list(ALL_SYSTEMS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    t0 = time.perf_counter()
    results = asyncio.run(run_all(args))
    log(f"total {time.perf_counter() - t0:.1f} s")
    rows = overheads(results)
    print(report(results, rows, env, args))
    if args.json:
        write_json(args.json, results, rows, env, args)
        log(f"wrote {args.json}")
    return 1 if any(r.error is not None for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
