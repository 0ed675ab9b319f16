"""A tiny HTTP/1.1 server for container and Kubernetes probes.

Routes (GET and HEAD)::

    /health   200 JSON {"status": "healthy", "ready": bool, **status()}
              500 JSON {"status": "error", "error": "<ExceptionName>"} when status() raises
    /ready    200 "ready\\n" or 503 "not ready\\n" (also when ready() raises)
    /live     200 "live\\n"
    /metrics  200 Prometheus text exposition of ``registry``

Unknown paths answer 404, other methods on a known path 405.

HTTP parsing is done by ``h11`` (sans-I/O) over ``asyncio.start_server``; this
module only moves bytes and picks responses.  The server is written to sit on a
port that anything in the cluster can reach, so it is defensive: every request
must arrive whole within ``request_timeout`` (a total deadline, not a per-read
one, so a slowloris client dribbling a byte at a time is cut off too), an idle
keep-alive connection is closed after ``idle_timeout``, request heads are capped
by ``max_request_size`` (h11 answers 431) and bodies by ``max_body_size`` (413),
malformed HTTP gets h11's status hint (400) and a close, writes have a deadline,
at most ``max_connections`` are served at once, and no exception escapes a
connection handler.  When all are taken, the connection idle the longest (one
waiting for a request) is closed to make room, so sockets left open by a
client cannot lock a kubelet's probe out; only when none is idle is the
newcomer closed.  ``stop()`` closes the listening
socket and every open connection and leaves no task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import h11
import prometheus_client

__all__ = ["HealthServer"]

log = logging.getLogger(__name__)

READ_CHUNK = 4096
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
ROUTES = ("/health", "/ready", "/live", "/metrics")
ALLOWED_METHODS = (b"GET", b"HEAD")


class _BodyTooLarge(Exception):
    """The request body exceeded ``max_body_size``."""


class _Response:
    """One complete response: status, content type, body and extra headers."""

    __slots__ = ("status", "content_type", "body", "headers")

    def __init__(
        self, status: int, content_type: str, body: bytes, headers: list[tuple[str, str]] | None = None
    ):
        self.status = status
        self.content_type = content_type
        self.body = body
        self.headers = headers or []


def _text(status: int, text: str, headers: list[tuple[str, str]] | None = None) -> _Response:
    return _Response(status, TEXT, text.encode(), headers)


def _json(status: int, doc: dict[str, Any]) -> _Response:
    # default=str: status() may hand us datetimes, Paths or ids; a probe must not 500 on them
    return _Response(status, JSON, json.dumps(doc, default=str).encode())


class HealthServer:
    """Health, readiness, liveness and metrics endpoints of one node.

    ``status`` returns extra fields for ``/health`` (node name, realm, node_id,
    endpoint, uptime_s...); they are merged after ``status`` and ``ready``, so
    ``status()`` may override them (for example to report ``"degraded"``).
    ``ready`` decides ``/ready``.  Both are called on the event loop for every
    probe, so they must be cheap and non-blocking.
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 8080,
        *,
        status: Callable[[], dict],
        ready: Callable[[], bool],
        registry: prometheus_client.CollectorRegistry,
        request_timeout: float = 10.0,
        idle_timeout: float = 10.0,
        write_timeout: float = 10.0,
        max_request_size: int = 8192,
        max_body_size: int = 65536,
        max_connections: int = 64,
    ):
        self.host = host
        self._port = port
        self._status = status
        self._ready = ready
        self._registry = registry
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.max_request_size = max_request_size
        self.max_body_size = max_body_size
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._idle: dict[asyncio.Task, float] = {}  # handlers waiting for a request -> since when
        self.evicted_idle = 0
        self._lock = asyncio.Lock()
        self._closing = False

    # ------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the configured one."""
        if self._server is not None and self._server.sockets:
            return self._server.sockets[0].getsockname()[1]
        return self._port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; calling it again while running does nothing."""
        async with self._lock:
            if self._server is not None:
                return
            self._closing = False
            self._server = await asyncio.start_server(
                self._handle, self.host or None, self._port, reuse_address=True
            )
            log.info("health server listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop listening, close every connection, and wait for the handlers."""
        async with self._lock:
            server, self._server = self._server, None
            if server is None:
                return
            self._closing = True
            server.close()
            # Let connections accepted just before close() reach _handle, where
            # they see _closing and leave, instead of outliving stop().
            for _ in range(3):
                await asyncio.sleep(0)
            handlers = list(self._handlers)
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            await server.wait_closed()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ connection
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._handlers) >= self.max_connections and not self._closing:
            self._evict_idle()
        if self._closing or task is None or len(self._handlers) >= self.max_connections:
            # stopping, or every connection is busy with a request: a probe retries
            writer.close()
            return
        self._handlers.add(task)
        try:
            await self._serve_connection(reader, writer)
        except asyncio.CancelledError:
            raise  # stop() cancels us; the finally below still closes the socket
        except OSError as exc:  # resets, broken pipes, write deadline (TimeoutError): the client's problem
            log.debug("health connection dropped: %r", exc)
        except Exception:  # never let one bad client take anything else down
            log.exception("health connection handler failed")
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                # a peer that never acknowledges the close must not pin the handler
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    def _evict_idle(self) -> None:
        """Close the connection that has waited longest for a request (it holds a slot for nothing)."""
        if not self._idle:
            return
        oldest = min(self._idle, key=self._idle.__getitem__)
        del self._idle[oldest]
        self._handlers.discard(oldest)  # its slot is free now; its finally closes the socket
        oldest.cancel()
        self.evicted_idle += 1

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_request_size)
        while True:
            try:
                request = await self._read_request(conn, reader)
            except h11.RemoteProtocolError as exc:
                await self._send_error(conn, writer, exc.error_status_hint, f"bad request: {exc}")
                return
            except _BodyTooLarge:
                await self._send_error(conn, writer, 413, "request body too large")
                return
            except TimeoutError:
                await self._send_error(conn, writer, 408, "request timeout")
                return
            if request is None:  # peer closed, or stayed idle too long, between requests
                return
            await self._send(conn, writer, self._respond(request), head=request.method == b"HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # h11 decided the connection must close (Connection: close, HTTP/1.0...)
            conn.start_next_cycle()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
        """Read one whole request (head and body); None on EOF or idle timeout.

        Two deadlines: ``idle_timeout`` for the first byte of a request (keep-alive
        silence is normal and closes quietly), then ``request_timeout`` for the
        rest of it, as a total, so bytes that trickle in do not extend it.
        """
        buffered, closed = conn.trailing_data  # a pipelined request may be waiting already
        if not buffered and not closed:
            task = asyncio.current_task()
            self._idle[task] = asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(self.idle_timeout):
                    data = await reader.read(READ_CHUNK)
            except TimeoutError:
                return None
            finally:
                self._idle.pop(task, None)
            conn.receive_data(data)
        async with asyncio.timeout(self.request_timeout):
            request = await self._next_event(conn, reader)
            if isinstance(request, h11.ConnectionClosed):
                return None
            assert isinstance(request, h11.Request), request
            body = 0
            while True:
                event = await self._next_event(conn, reader)
                if isinstance(event, h11.EndOfMessage):
                    return request
                if isinstance(event, h11.Data):
                    body += len(event.data)
                    if body > self.max_body_size:
                        raise _BodyTooLarge

    @staticmethod
    async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
        """The next h11 event, reading from the socket as needed (b"" tells h11 about EOF)."""
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await reader.read(READ_CHUNK))

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, response: _Response, *, head: bool = False
    ) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            *response.headers,
        ]
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        # HEAD: the headers describe the GET body, but h11 frames the body as empty.
        if response.body and not head:
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        writer.write(data)
        async with asyncio.timeout(self.write_timeout):
            await writer.drain()

    async def _send_error(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, text: str
    ) -> None:
        """Best-effort error response before closing; h11 may forbid it (then just close)."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await self._send(conn, writer, _text(status, text + "\n", [("Connection", "close")]))
        except (h11.LocalProtocolError, OSError, TimeoutError) as exc:
            log.debug("could not send %d to health client: %r", status, exc)

    # ------------------------------------------------------------ routing
    def _respond(self, request: h11.Request) -> _Response:
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        if path not in ROUTES:
            return _text(404, "not found\n")
        if request.method not in ALLOWED_METHODS:
            return _text(405, "method not allowed\n", [("Allow", "GET, HEAD")])
        try:
            return getattr(self, "_route_" + path[1:])()
        except Exception as exc:  # a failing callback is a 500 with its name, not a dead probe
            log.warning("health endpoint %s failed", path, exc_info=True)
            return _json(500, {"status": "error", "error": type(exc).__name__})

    def _route_health(self) -> _Response:
        extra = self._status()
        return _json(200, {"status": "healthy", "ready": bool(self._ready()), **extra})

    def _route_ready(self) -> _Response:
        try:
            ok = bool(self._ready())
        except Exception:
            log.warning("readiness callback failed", exc_info=True)
            ok = False
        return _text(200, "ready\n") if ok else _text(503, "not ready\n")

    def _route_live(self) -> _Response:
        return _text(200, "live\n")

    def _route_metrics(self) -> _Response:
        body = prometheus_client.generate_latest(self._registry)
        return _Response(200, prometheus_client.CONTENT_TYPE_LATEST, body)
