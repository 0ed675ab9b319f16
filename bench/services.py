"""Service-layer benchmark: ``Node.call`` on a discovery-cache hit against a bare request.

Run ``python bench/services.py --help``.  Two :class:`~macula_lab.runtime.node.Node`\\ s on
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
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The harness shared by the benchmarks lives next to this file (_common.py).  Put this
# folder on sys.path so that `import _common` works however the script is started
# (python bench/services.py, from inside bench/, or imported as a module).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # also makes macula_lab importable from a checkout that is not installed
from _common import SystemResult, log

from macula_lab.core.messages import MessageType
from macula_lab.runtime.node import Node
from macula_lab.transport.certs import NodeCert, lab_certs
from macula_lab.transport.quic import TlsConfig

PROCEDURE = "bench.echo"
SERVICE = "bench.svc"
REALM = "bench.realm"
BARE = "bare request"
CALL = "service call (cache hit)"
ALL_SYSTEMS = (BARE, CALL)
NAME_WIDTH = max(map(len, ALL_SYSTEMS))
TARGET_OVERHEAD = 0.15


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
async def run_all(args: argparse.Namespace) -> dict[str, SystemResult]:
    payload = os.urandom(args.payload)
    results = {name: SystemResult(name) for name in args.system_list}
    with tempfile.TemporaryDirectory(prefix="macula-bench-") as tmp:
        certs = lab_certs(tmp, ["a", "b"], ips=["127.0.0.1"])
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
                            r = await _common.measure(call, args)
                            if name == CALL and pair.misses() != misses:
                                raise AssertionError(
                                    f"{pair.misses() - misses} measured calls missed the discovery cache"
                                )
                    except Exception as exc:  # includes TimeoutError: a hung measurement
                        tag = f"[round {rnd}/{args.rounds}] {name}:"
                        res.error = _common.crashed(exc, args.timeout, tag)
                        continue
                    res.rounds.append(r)
                    _common.log_round(f"[round {rnd}/{args.rounds}]", name, NAME_WIDTH, r, t0)
            finally:
                await pair.stop()
                await asyncio.sleep(0.05)  # let close frames and cancelled tasks drain
    return results


# ====================================================================== report
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
    return [
        Overhead(
            f"service layer overhead, {what}",
            value,
            f"<= {TARGET_OVERHEAD:.0%}",
            _common.verdict(value, value <= TARGET_OVERHEAD, judged),
        )
        for what, value, judged in rows
    ]


def report(
    results: dict[str, SystemResult], rows: list[Overhead], env: dict[str, Any], args: argparse.Namespace
) -> str:
    lines = [
        _common.environment_line(env, ["aioquic", "msgpack"]),
        f"workload: {args.payload}-byte payload, {args.requests} calls per measurement, "
        f"{args.inflight} in flight for throughput, {args.warmup} warm-up, median of {args.rounds} round(s)",
        "note: two Nodes on loopback QUIC, TLS 1.3 with certificate verification; "
        "both handlers are plain functions answered without a task",
        "",
        *_common.results_table(results, NAME_WIDTH),
        "",
        *_common.verdict_lines(
            (r.label, "    n/a" if math.isnan(r.value) else f"{r.value:+7.1%}", r.target, r.verdict)
            for r in rows
        ),
    ]
    return "\n".join(lines)


# ========================================================================= CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return _common.parse_load_args(
        __doc__,
        argv,
        unit="calls",
        rounds=5,
        all_systems=ALL_SYSTEMS,
        timeout_help="give up on a measurement after this many seconds",
        quick_help="a short smoke run (a few seconds)",
        systems_help=f"comma-separated subset to run, e.g. for profiling one side (default: {', '.join(ALL_SYSTEMS)})",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = _common.environment("aioquic", "msgpack")
    results = _common.run_timed(run_all(args))
    rows = overheads(results)
    print(report(results, rows, env, args))
    if args.json:
        _common.write_load_json(args.json, env, args, results, overheads=rows)
        log(f"wrote {args.json}")
    return 1 if any(r.error is not None for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
