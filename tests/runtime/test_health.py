"""HealthServer: routes, probes, robustness against bad clients, clean stop."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import prometheus_client
import pytest

from macula_lab.runtime.health import HealthServer

from ..timing import eventually

# Never route loopback probes through an HTTP proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class State:
    def __init__(self) -> None:
        self.ready = False
        self.status: dict = {"name": "node-1", "realm": "com.example.realm", "node_id": "ab" * 32}
        self.fail: Exception | None = None

    def get_status(self) -> dict:
        if self.fail is not None:
            raise self.fail
        return dict(self.status)


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
def registry() -> prometheus_client.CollectorRegistry:
    reg = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("macula_test_probes", "probes seen by the test", registry=reg)
    counter.inc(3)
    return reg


def make_server(state: State, registry: prometheus_client.CollectorRegistry, **kw) -> HealthServer:
    return HealthServer(
        "127.0.0.1", 0, status=state.get_status, ready=lambda: state.ready, registry=registry, **kw
    )


@pytest.fixture
async def server(state: State, registry) -> AsyncIterator[HealthServer]:
    srv = make_server(state, registry)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


# ------------------------------------------------------------------ clients
def _fetch_sync(url: str, method: str, data: bytes | None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, data=data)
    try:
        with _OPENER.open(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


async def fetch(
    srv: HealthServer, path: str, method: str = "GET", data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(_fetch_sync, f"http://127.0.0.1:{srv.port}{path}", method, data)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


async def raw_exchange(srv: HealthServer, data: bytes) -> bytes:
    """Send bytes, read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def read_one_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, headers, _ = parse_response(head)
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


def other_tasks() -> set[asyncio.Task]:
    return asyncio.all_tasks() - {asyncio.current_task()}


# ------------------------------------------------------------------ routes
async def test_health_reports_status_and_readiness(server: HealthServer, state: State) -> None:
    status, headers, body = await fetch(server, "/health")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert doc == {"status": "healthy", "ready": False, **state.status}

    state.ready = True
    state.status["uptime_s"] = 1.5
    doc = json.loads((await fetch(server, "/health"))[2])
    assert doc["ready"] is True and doc["uptime_s"] == 1.5


async def test_health_serialises_non_json_values(server: HealthServer, state: State) -> None:
    state.status = {"since": object}  # not JSON: rendered with str(), never a 500
    status, _, body = await fetch(server, "/health")
    assert status == 200 and "class 'object'" in json.loads(body)["since"]


async def test_ready_flips_from_503_to_200(server: HealthServer, state: State) -> None:
    status, _, body = await fetch(server, "/ready")
    assert (status, body) == (503, b"not ready\n")
    state.ready = True
    status, _, body = await fetch(server, "/ready")
    assert (status, body) == (200, b"ready\n")


async def test_live(server: HealthServer) -> None:
    status, headers, body = await fetch(server, "/live")
    assert (status, body) == (200, b"live\n")
    assert headers["Content-Type"].startswith("text/plain")


async def test_query_string_is_ignored(server: HealthServer) -> None:
    assert (await fetch(server, "/live?verbose=1"))[0] == 200


async def test_metrics_expose_registered_counter(server: HealthServer) -> None:
    status, headers, body = await fetch(server, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
    assert b"# TYPE macula_test_probes_total counter" in body
    assert b"macula_test_probes_total 3.0" in body


async def test_head_sends_headers_without_body(server: HealthServer) -> None:
    raw = await raw_exchange(server, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, body = parse_response(raw)
    assert status == 200
    assert int(headers["content-length"]) > 0  # the length a GET would have
    assert body == b""


async def test_unknown_path_is_404(server: HealthServer) -> None:
    assert (await fetch(server, "/nope"))[0] == 404
    assert (await fetch(server, "/health/"))[0] == 404
    assert (await fetch(server, "/nope", "POST", b"x"))[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_are_405(server: HealthServer, method: str) -> None:
    status, headers, _ = await fetch(server, "/health", method, b"{}" if method in ("POST", "PUT") else None)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"


# ------------------------------------------------------------------ failures
async def test_status_raising_is_500_with_error_name(
    server: HealthServer, state: State, caplog: pytest.LogCaptureFixture
) -> None:
    state.fail = KeyError("realm")
    with caplog.at_level(logging.WARNING, logger="macula_lab.runtime.health"):
        status, _, body = await fetch(server, "/health")
    assert status == 500
    assert json.loads(body) == {"status": "error", "error": "KeyError"}
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)
    # the server keeps serving
    assert (await fetch(server, "/live"))[0] == 200


async def test_ready_raising_reads_as_not_ready(state: State, registry) -> None:
    def boom() -> bool:
        raise RuntimeError("db down")

    async with HealthServer("127.0.0.1", 0, status=state.get_status, ready=boom, registry=registry) as srv:
        assert (await fetch(srv, "/ready"))[0] == 503


async def test_malformed_request_is_400_and_closed(server: HealthServer) -> None:
    status, headers, _ = parse_response(await raw_exchange(server, b"THIS IS NOT HTTP\r\n\r\n"))
    assert status == 400
    assert headers["connection"] == "close"


async def test_bad_header_is_400(server: HealthServer) -> None:
    raw = await raw_exchange(server, b"GET /live HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
    assert parse_response(raw)[0] == 400


async def test_oversized_request_head_is_rejected(state: State, registry) -> None:
    async with make_server(state, registry, max_request_size=1024) as srv:
        raw = await raw_exchange(srv, b"GET /live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4096 + b"\r\n\r\n")
    assert parse_response(raw)[0] == 431


async def test_oversized_body_is_413(state: State, registry) -> None:
    async with make_server(state, registry, max_body_size=100) as srv:
        raw = await raw_exchange(
            srv, b"GET /live HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"b" * 1000
        )
    assert parse_response(raw)[0] == 413


async def test_eof_mid_request_does_not_break_server(server: HealthServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /live HTTP/1.1\r\nHo")
    writer.write_eof()
    await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    assert (await fetch(server, "/live"))[0] == 200


async def test_slowloris_client_gets_408(state: State, registry) -> None:
    async with make_server(state, registry, request_timeout=0.3) as srv:
        loop = asyncio.get_running_loop()
        # a raw socket: a byte sent after the server closed draws a reset, and a stream reader
        # would drop the 408 it had already read when that reset arrives
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.setblocking(False)

        async def read_all() -> bytes:
            received = bytearray()
            while True:
                try:
                    chunk = await loop.sock_recv(sock, 65536)
                except ConnectionResetError:
                    return bytes(received)
                if not chunk:
                    return bytes(received)
                received += chunk

        response = asyncio.create_task(read_all())
        # one byte every 50 ms (at least 1.5 s in all): each read succeeds, the request is too slow
        request = b"GET /live HTTP/1.1\r\nHost: x\r\n"
        sent = 0
        for byte in request:
            if response.done():
                break
            try:
                await loop.sock_sendall(sock, bytes([byte]))
            except OSError:
                break
            sent += 1
            await asyncio.sleep(0.05)
        raw = await asyncio.wait_for(response, 5)
        sock.close()
    assert parse_response(raw)[0] == 408
    assert sent < len(request)  # cut off after its 0.3 s, not when the client had finished


async def test_idle_keepalive_connection_is_closed_quietly(state: State, registry) -> None:
    async with make_server(state, registry, idle_timeout=0.2) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()


async def test_at_the_limit_the_longest_idle_connection_makes_room(state: State, registry) -> None:
    async with make_server(state, registry, max_connections=1) as srv:
        r1, w1 = await asyncio.open_connection("127.0.0.1", srv.port)
        w1.write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_one_response(r1))[0] == 200  # served, now idle (keep-alive)
        r2, w2 = await asyncio.open_connection("127.0.0.1", srv.port)
        w2.write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_one_response(r2))[0] == 200  # the newcomer is served...
        assert await asyncio.wait_for(r1.read(), 5) == b""  # ...in the idle one's place
        assert srv.evicted_idle == 1
        for w in (w1, w2):
            w.close()
            await w.wait_closed()


async def test_a_connection_busy_with_a_request_is_not_evicted(state: State, registry) -> None:
    async with make_server(state, registry, max_connections=1, request_timeout=30) as srv:
        r1, w1 = await asyncio.open_connection("127.0.0.1", srv.port)
        w1.write(b"GET /live HTTP/1.1\r\n")  # a request under way (its head unfinished)
        await asyncio.sleep(0.2)
        r2, w2 = await asyncio.open_connection("127.0.0.1", srv.port)
        assert await asyncio.wait_for(r2.read(), 5) == b""  # no idle slot: the newcomer is closed
        w1.write(b"Host: x\r\n\r\n")
        assert (await read_one_response(r1))[0] == 200  # and the busy one finishes
        for w in (w1, w2):
            w.close()
            await w.wait_closed()


async def test_idle_sockets_cannot_lock_a_probe_out(state: State, registry) -> None:
    """Once, 64 idle TCP sockets made /health refuse a kubelet probe."""
    async with make_server(state, registry, max_connections=64) as srv:
        idle = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(80)]
        await asyncio.sleep(0.2)
        for _ in range(3):  # probes keep getting answers
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await read_one_response(reader))[0] == 200
            writer.close()
            await writer.wait_closed()
        for _, w in idle:
            w.close()


# ------------------------------------------------------------------ keep-alive and lifecycle
async def test_keep_alive_and_pipelining(server: HealthServer, state: State) -> None:
    state.ready = True
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await read_one_response(reader)
        assert (status, body) == (200, b"live\n")
        writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_one_response(reader))[2] == b"ready\n"
        # two requests in one write: answered in order on the same connection
        writer.write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\nHEAD /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await read_one_response(reader)
        assert (first[0], first[2]) == (200, b"live\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert parse_response(head)[0] == 200
    finally:
        writer.close()
        await writer.wait_closed()


async def test_start_and_stop_are_idempotent(state: State, registry) -> None:
    srv = make_server(state, registry)
    assert not srv.running
    await srv.stop()  # stop before start is harmless
    await srv.start()
    port = srv.port
    assert port != 0 and srv.running
    await srv.start()
    assert srv.port == port
    assert srv.url == f"http://127.0.0.1:{port}"
    await srv.stop()
    await srv.stop()
    assert not srv.running
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_OPENER.open, f"http://127.0.0.1:{port}/live", timeout=2)
    # and it can be started again
    await srv.start()
    assert (await fetch(srv, "/live"))[0] == 200
    await srv.stop()


async def test_stop_closes_open_connections_and_leaves_no_tasks(state: State, registry) -> None:
    srv = make_server(state, registry)
    await srv.start()
    conns = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_one_response(reader))[0] == 200  # keep-alive: still open
        conns.append((reader, writer))
    # one more that connected but never sent anything, and one mid-request
    idle = await asyncio.open_connection("127.0.0.1", srv.port)
    partial = await asyncio.open_connection("127.0.0.1", srv.port)
    partial[1].write(b"GET /li")
    conns += [idle, partial]
    await eventually(other_tasks, 5, "handlers running")

    await asyncio.wait_for(srv.stop(), 5)

    assert other_tasks() == set()
    for reader, writer in conns:
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it
        writer.close()
        await writer.wait_closed()
