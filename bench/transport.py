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
import math
import os
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

# The harness shared by the benchmarks lives next to this file (_common.py).  Put this
# folder on sys.path so that `import _common` works however the script is started
# (python bench/transport.py, from inside bench/, or imported as a module).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # also makes macula_lab importable from a checkout that is not installed
from _common import RoundResult, SystemResult, log

from macula_lab.core.messages import Frame, MessageType
from macula_lab.core.session import Identity, PeerInfo
from macula_lab.transport.certs import NodeCert, lab_certs
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
        identity = Identity(self.certs[name].node_id, "bench.realm", name)  # the id its certificate binds
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
async def run_round(system: System, args: argparse.Namespace) -> RoundResult:
    """Fresh endpoints, warm-up, sequential latency, throughput, teardown."""
    await system.start()
    try:
        reply = await system.call()
        if not system.check(reply):
            raise AssertionError(f"{system.name}: reply is not an echo of the request: {reply!r:.200}")
        return await _common.measure(system.call, args)
    finally:
        await system.stop()
        await asyncio.sleep(0.05)  # let close frames and cancelled tasks drain before the next system


async def run_all(args: argparse.Namespace, systems: list[str]) -> dict[str, SystemResult]:
    payload = os.urandom(args.payload)
    results = {name: SystemResult(name) for name in systems}
    with tempfile.TemporaryDirectory(prefix="macula-bench-") as tmp:
        certs = lab_certs(tmp, ["a", "b"], ips=["127.0.0.1"])
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
                    res.error = _common.crashed(exc, args.timeout, f"[round {rnd}/{args.rounds}] {name}:")
                    continue
                res.rounds.append(r)
                _common.log_round(f"[round {rnd}/{args.rounds}]", name, NAME_WIDTH, r, t0)
    return results


# ====================================================================== report
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
        ok = value >= target if op == ">=" else value <= target
        what = "throughput" if metric == thr else "seq p50"
        out.append(
            Ratio(
                f"{macula} {what} / {other} {what}",
                value,
                f"{op} {target:.1f}x",
                _common.verdict(value, ok, judged),
            )
        )
    return out


def report(
    results: dict[str, SystemResult], rs: list[Ratio], env: dict[str, Any], args: argparse.Namespace
) -> str:
    lines = [
        _common.environment_line(env, ["aioquic", "grpcio", "msgpack"]),
        f"workload: {args.payload}-byte payload, {args.requests} requests per measurement, "
        f"{args.inflight} in flight for throughput, {args.warmup} warm-up, median of {args.rounds} round(s)",
        "note: macula and raw aioquic use TLS 1.3 with certificate verification; "
        "grpc.aio uses an insecure (plaintext) channel and does its I/O in C-core threads",
        "",
        *_common.results_table(results, NAME_WIDTH),
        "",
        *_common.verdict_lines(
            (r.label, "   n/a" if math.isnan(r.value) else f"{r.value:6.2f}x", r.target, r.verdict)
            for r in rs
        ),
    ]
    return "\n".join(lines)


# ========================================================================= CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return _common.parse_load_args(
        __doc__,
        argv,
        unit="requests",
        rounds=3,
        all_systems=ALL_SYSTEMS,
        timeout_help="give up on a system after this many seconds per round",
        quick_help="a short smoke run (well under a minute)",
        systems_help=f"comma-separated subset to run (default: all of {', '.join(ALL_SYSTEMS)})",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = _common.environment("aioquic", "grpcio", "msgpack")
    results = _common.run_timed(run_all(args, args.system_list))
    rs = ratios(results)
    print(report(results, rs, env, args))
    if args.json:
        _common.write_load_json(args.json, env, args, results, ratios=rs)
        log(f"wrote {args.json}")
    return 1 if any(r.error is not None for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
