"""Transport benchmark: macula's QUIC request path against raw aioquic and grpc.aio.

Run ``python bench/transport.py --help``.  Everything runs on loopback, in one
process, on the default asyncio event loop (no uvloop), one system after the
other with fresh endpoints each time:

``macula (multiplex)`` / ``macula (per-request)``
    Two :class:`~macula_lab.transport.quic.QuicTransport` nodes; node ``a``
    sends ``CALL {"procedure": "bench.echo", "args": payload}`` to node ``b``,
    whose handler returns the args in a ``REPLY``.  Includes everything a real
    request pays: frame encode/validate/decode, request-id matching, the
    connection pool lookup and a handler task on the serving side.
``raw aioquic``
    The floor for QUIC in Python: a bare ``QuicConnectionProtocol`` pair, one
    new stream per request, the server echoing a stream's bytes when it ends.
    Same certificates (verification on), same ALPN, same msgpack bytes.
    The client flushes (``transmit()``) right after each request.
``raw aioquic (coalesced)`` (informational)
    The same, but the client defers the flush to the next loop iteration as
    QuicTransport does, so concurrent requests share datagrams.  Separates what
    batching buys from what macula's own code costs.
``grpc.aio``
    A generic unary method ``/bench.Echo/Call`` carrying the same msgpack bytes
    (identity serialisers, no generated code) over an *insecure* (plaintext
    HTTP/2) channel.  gRPC's C core does its I/O and HTTP/2 work in its own
    threads, so on a multi-core box it is not limited to the one loop thread.

For each system: warm-up, then (a) sequential latency, N requests one at a
time (p50/p99), and (b) throughput, N requests with ``--inflight`` requests
outstanding.  Every measurement is repeated ``--rounds`` times (rounds are
interleaved across systems so slow drift of a noisy machine hits all of them)
and the median across rounds is reported.

Exit status: 0 whether targets are met or not (this is a benchmark, not a
test); 1 if a system crashed (its traceback goes to stderr).
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
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import msgpack
from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

try:  # a checkout that is not pip-installed: import the package from the tree
    import macula_lab  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from macula_lab.certs import NodeCert, lab_certs
from macula_lab.core.messages import Frame, MessageType
from macula_lab.core.session import Identity, PeerInfo
from macula_lab.transport.quic import ALPN, QuicTransport, TlsConfig

PROCEDURE = "bench.echo"
HOST = "127.0.0.1"
# QUIC flow-control windows used by both QUIC systems (the values QuicTransport uses)
QUIC_MAX_DATA = 16 * 1024 * 1024
QUIC_MAX_STREAM_DATA = 4 * 1024 * 1024

# system names, in report order
MACULA = "macula (multiplex)"
MACULA_PER_REQUEST = "macula (per-request)"
RAW = "raw aioquic"
RAW_COALESCED = "raw aioquic (coalesced)"
GRPC = "grpc.aio"
ALL_SYSTEMS = (MACULA, MACULA_PER_REQUEST, RAW, RAW_COALESCED, GRPC)
NAME_WIDTH = max(map(len, ALL_SYSTEMS))


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays a clean report."""
    print(msg, file=sys.stderr, flush=True)


# ====================================================================== systems
class System(ABC):
    """One request/reply implementation under test: start, call (repeatedly), stop."""

    name: str

    def __init__(self, payload: bytes, certs: dict[str, NodeCert]):
        self.payload = payload
        self.certs = certs
        # what raw aioquic and gRPC put on the wire (macula builds its own frame)
        self.packed = msgpack.packb({"procedure": PROCEDURE, "args": payload}, use_bin_type=True)

    @abstractmethod
    async def start(self) -> None:
        """Bring up fresh server and client endpoints (and connect them)."""

    @abstractmethod
    async def call(self) -> Any:
        """One request; returns the reply (checked by :meth:`check` during warm-up only)."""

    @abstractmethod
    def check(self, reply: Any) -> bool:
        """Whether ``reply`` is the echo of our request."""

    @abstractmethod
    async def stop(self) -> None:
        """Tear everything down."""


class MaculaSystem(System):
    """Two QuicTransport nodes, ``a`` calling ``b``'s echo handler."""

    def __init__(self, payload: bytes, certs: dict[str, NodeCert], stream_mode: str):
        super().__init__(payload, certs)
        self.stream_mode = stream_mode
        self.name = f"macula ({stream_mode})"
        self.a: QuicTransport | None = None
        self.b: QuicTransport | None = None
        self.target = ""

    @staticmethod
    async def _echo(frame: Frame, peer: PeerInfo) -> tuple[MessageType, dict[str, Any]]:
        return MessageType.REPLY, {"result": frame.body["args"]}

    def _node(self, name: str) -> QuicTransport:
        identity = Identity(os.urandom(32), "bench.realm", name)
        tls = TlsConfig.from_node_cert(self.certs[name])
        return QuicTransport(identity, tls=tls, stream_mode=self.stream_mode)

    async def start(self) -> None:
        self.a, self.b = self._node("a"), self._node("b")
        await self.a.start(self._echo)
        self.target = await self.b.start(self._echo)

    async def call(self) -> Frame:
        assert self.a is not None
        # a fresh body each time: request() stores the request id in it
        return await self.a.request(
            self.target, MessageType.CALL, {"procedure": PROCEDURE, "args": self.payload}
        )

    def check(self, reply: Frame) -> bool:
        return reply.type is MessageType.REPLY and reply.body["result"] == self.payload

    async def stop(self) -> None:
        for node in (self.a, self.b):
            if node is not None:
                await node.close()
        self.a = self.b = None


class _RawEchoServer(QuicConnectionProtocol):
    """Echo every stream's bytes back on the same stream once the peer ends it."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._buffers: dict[int, bytearray] = {}

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            if event.end_stream:
                buf = self._buffers.pop(event.stream_id, None)
                data = event.data if buf is None else bytes(buf + event.data)
                self._quic.send_stream_data(event.stream_id, data, end_stream=True)
                # no transmit() needed: aioquic transmits after processing a datagram
            else:
                self._buffers.setdefault(event.stream_id, bytearray()).extend(event.data)


class _RawEchoClient(QuicConnectionProtocol):
    """One new bidirectional stream per request; the reply is complete when its stream ends.

    ``coalesce=False`` (the baseline): ``transmit()`` right after each send, so
    every request leaves in its own datagram at once.  ``coalesce=True``: defer
    the flush to the next loop iteration (aioquic's ``_transmit_soon``, what
    QuicTransport does), so requests sent in the same iteration share packets.
    """

    coalesce = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._waiting: dict[int, tuple[asyncio.Future[bytes], bytearray]] = {}

    async def request(self, data: bytes) -> bytes:
        stream_id = self._quic.get_next_available_stream_id()
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._waiting[stream_id] = (fut, bytearray())
        self._quic.send_stream_data(stream_id, data, end_stream=True)
        if self.coalesce:
            self._transmit_soon()
        else:
            self.transmit()
        return await fut

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            waiter = self._waiting.get(event.stream_id)
            if waiter is None:
                return
            fut, buf = waiter
            buf += event.data
            if event.end_stream:
                del self._waiting[event.stream_id]
                if not fut.done():
                    fut.set_result(bytes(buf))
        elif isinstance(event, events.ConnectionTerminated):
            for fut, _ in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection closed: {event.reason_phrase}"))
            self._waiting.clear()


class RawAioquicSystem(System):
    """The floor: bare aioquic, same certificates (verified), same ALPN, same bytes."""

    def __init__(self, payload: bytes, certs: dict[str, NodeCert], *, coalesce: bool = False):
        super().__init__(payload, certs)
        self.coalesce = coalesce
        self.name = RAW_COALESCED if coalesce else RAW
        self._stack: AsyncExitStack | None = None
        self.client: _RawEchoClient | None = None

    def _config(self, *, is_client: bool) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            max_data=QUIC_MAX_DATA,
            max_stream_data=QUIC_MAX_STREAM_DATA,
        )
        if is_client:
            config.load_verify_locations(cafile=str(self.certs["b"].ca))
            config.server_name = HOST
        else:
            config.load_cert_chain(str(self.certs["b"].cert), str(self.certs["b"].key))
        return config

    async def start(self) -> None:
        self._stack = AsyncExitStack()
        server = await serve(
            HOST, 0, configuration=self._config(is_client=False), create_protocol=_RawEchoServer
        )
        self._stack.callback(server.close)
        port = server._transport.get_extra_info("socket").getsockname()[1]
        client = await self._stack.enter_async_context(
            connect(HOST, port, configuration=self._config(is_client=True), create_protocol=_RawEchoClient)
        )
        assert isinstance(client, _RawEchoClient)
        client.coalesce = self.coalesce
        self.client = client

    async def call(self) -> bytes:
        assert self.client is not None
        return await self.client.request(self.packed)

    def check(self, reply: bytes) -> bool:
        return reply == self.packed

    async def stop(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()  # closes the client connection, then the server
        self._stack = None
        self.client = None


class GrpcSystem(System):
    """grpc.aio generic unary method over an insecure loopback channel, same loop."""

    name = GRPC

    def __init__(self, payload: bytes, certs: dict[str, NodeCert]):
        super().__init__(payload, certs)
        self.server: Any = None
        self.channel: Any = None
        self.stub: Callable[[bytes], Awaitable[bytes]] | None = None

    async def start(self) -> None:
        import grpc  # imported lazily: an optional dependency (macula-lab[bench])

        async def echo(request: bytes, context: Any) -> bytes:
            return request

        # None (de)serialisers: bytes in, bytes out, no generated code
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo",
            {
                "Call": grpc.unary_unary_rpc_method_handler(
                    echo, request_deserializer=None, response_serializer=None
                )
            },
        )
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port(f"{HOST}:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"{HOST}:{port}")
        await self.channel.channel_ready()
        self.stub = self.channel.unary_unary(
            "/bench.Echo/Call", request_serializer=None, response_deserializer=None
        )

    async def call(self) -> bytes:
        assert self.stub is not None
        return await self.stub(self.packed)

    def check(self, reply: bytes) -> bool:
        return reply == self.packed

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(None)
        self.channel = self.server = self.stub = None


def make_system(name: str, payload: bytes, certs: dict[str, NodeCert]) -> System:
    if name == MACULA:
        return MaculaSystem(payload, certs, "multiplex")
    if name == MACULA_PER_REQUEST:
        return MaculaSystem(payload, certs, "per-request")
    if name == RAW:
        return RawAioquicSystem(payload, certs)
    if name == RAW_COALESCED:
        return RawAioquicSystem(payload, certs, coalesce=True)
    if name == GRPC:
        return GrpcSystem(payload, certs)
    raise ValueError(f"unknown system {name!r}")


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
    """Latencies (µs) of ``n`` requests sent one after the other."""
    clock = time.perf_counter_ns
    out: list[float] = []
    for _ in range(n):
        t0 = clock()
        await call()
        out.append((clock() - t0) / 1000)
    return out


async def concurrent(call: Callable[[], Awaitable[Any]], n: int, inflight: int) -> float:
    """Requests per second for ``n`` requests with ``inflight`` workers keeping requests outstanding."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(inflight, n))))
    return n / (time.perf_counter() - t0)


async def run_round(system: System, args: argparse.Namespace) -> RoundResult:
    """Fresh endpoints, warm-up, sequential latency, throughput, teardown."""
    await system.start()
    try:
        reply = await system.call()
        if not system.check(reply):
            raise AssertionError(f"{system.name}: reply is not an echo of the request: {reply!r:.200}")
        # warm-up both patterns: connection setup, stream credit, caches, allocator
        await sequential(system.call, args.warmup)
        await concurrent(system.call, args.warmup, args.inflight)
        gc.collect()
        latencies = sorted(await sequential(system.call, args.requests))
        gc.collect()
        rps = await concurrent(system.call, args.requests, args.inflight)
    finally:
        await system.stop()
        await asyncio.sleep(0.05)  # let close frames and cancelled tasks drain before the next system
    return RoundResult(percentile(latencies, 50), percentile(latencies, 99), rps)


async def run_all(args: argparse.Namespace, systems: list[str]) -> dict[str, SystemResult]:
    payload = os.urandom(args.payload)
    results = {name: SystemResult(name) for name in systems}
    with tempfile.TemporaryDirectory(prefix="macula-bench-") as tmp:
        certs = lab_certs(tmp, ["a", "b"])
        for rnd in range(1, args.rounds + 1):
            for name in systems:
                res = results[name]
                if res.error is not None:
                    continue  # crashed in an earlier round: do not retry
                t0 = time.perf_counter()
                try:
                    async with asyncio.timeout(args.timeout):
                        r = await run_round(make_system(name, payload, certs), args)
                except Exception as exc:  # includes TimeoutError: a hung system
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
        "grpcio": ver("grpcio"),
        "msgpack": ver("msgpack"),
        "cpu_count": os.cpu_count(),
        "event_loop": type(asyncio.get_event_loop_policy()).__name__,
    }


@dataclass
class Ratio:
    label: str
    value: float
    target: str  # e.g. ">= 1.0x"
    verdict: str  # PASS / MISS / info / n/a


def ratios(results: dict[str, SystemResult]) -> list[Ratio]:
    """Macula against the baselines.

    Targets are judged for the default (multiplex) mode only; the per-request
    mode and the coalesced raw baseline are shown for information.  Pairs whose
    systems were not run (``--systems``) are left out.
    """
    thr, p50 = "throughput_rps", "seq_p50_us"
    # (macula row, metric, baseline row, comparison, target, judged)
    checks = [
        (MACULA, thr, RAW, ">=", 1.0, True),
        (MACULA, thr, GRPC, ">=", 1.0, True),
        (MACULA, p50, RAW, "<=", 1.2, True),
        (MACULA, thr, RAW_COALESCED, ">=", 1.0, False),
        (MACULA, p50, RAW_COALESCED, "<=", 1.2, False),
        (MACULA_PER_REQUEST, thr, RAW, ">=", 1.0, False),
        (MACULA_PER_REQUEST, thr, GRPC, ">=", 1.0, False),
        (MACULA_PER_REQUEST, p50, RAW, "<=", 1.2, False),
    ]
    out: list[Ratio] = []
    for macula, metric, other, op, target, judged in checks:
        if macula not in results or other not in results:
            continue
        value = results[macula].median(metric) / results[other].median(metric)
        if math.isnan(value):
            verdict = "n/a"  # one side crashed
        elif not judged:
            verdict = "info"
        else:
            ok = value >= target if op == ">=" else value <= target
            verdict = "PASS" if ok else "MISS"
        what = "throughput" if metric == thr else "seq p50"
        out.append(Ratio(f"{macula} {what} / {other} {what}", value, f"{op} {target:.1f}x", verdict))
    return out


def report(
    results: dict[str, SystemResult], rs: list[Ratio], env: dict[str, Any], args: argparse.Namespace
) -> str:
    lines = [
        f"environment: Python {env['python']} ({env['implementation']}), aioquic {env['aioquic']}, "
        f"grpcio {env['grpcio']}, msgpack {env['msgpack']}, {env['cpu_count']} CPUs, "
        f"{env['event_loop']} (no uvloop), {env['platform']}",
        f"workload: {args.payload}-byte payload, {args.requests} requests per measurement, "
        f"{args.inflight} in flight for throughput, {args.warmup} warm-up, median of {args.rounds} round(s)",
        "note: macula and raw aioquic use TLS 1.3 with certificate verification; "
        "grpc.aio uses an insecure (plaintext) channel and does its I/O in C-core threads",
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
    width = max((len(r.label) for r in rs), default=0)
    for r in rs:
        shown = "   n/a" if math.isnan(r.value) else f"{r.value:6.2f}x"
        lines.append(f"{r.label:<{width}}  {shown}  (target {r.target})  {r.verdict}")
    return "\n".join(lines)


def write_json(
    path: str,
    results: dict[str, SystemResult],
    rs: list[Ratio],
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
        "ratios": [asdict(r) for r in rs],
    }
    Path(path).write_text(json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")


def _json_safe(value: Any) -> Any:
    """NaN (a figure of a crashed system) is not JSON: it becomes null."""
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
        help="requests per measurement (default 2000; 1000 with --quick)",
    )
    p.add_argument(
        "--inflight", type=int, default=64, help="concurrent requests in the throughput test (default 64)"
    )
    p.add_argument("--payload", type=int, default=64, help="payload size in bytes (default 64)")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up requests per pattern (default 200; 100 with --quick)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="repetitions; the median is reported (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="give up on a system after this many seconds per round"
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run (well under a minute)")
    p.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help=f"comma-separated subset to run (default: all of {', '.join(ALL_SYSTEMS)})",
    )
    p.add_argument("--json", metavar="PATH", help="also write all figures to this JSON file")
    args = p.parse_args(argv)
    quick = args.quick
    args.requests = args.requests if args.requests is not None else (1000 if quick else 2000)
    args.warmup = args.warmup if args.warmup is not None else (100 if quick else 200)
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
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
    results = asyncio.run(run_all(args, args.system_list))
    log(f"total {time.perf_counter() - t0:.1f} s")
    rs = ratios(results)
    print(report(results, rs, env, args))
    if args.json:
        write_json(args.json, results, rs, env, args)
        log(f"wrote {args.json}")
    return 1 if any(r.error is not None for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
