"""The node runtime: one mesh node inside an already running asyncio loop.

A :class:`Node` owns its transport (QUIC, or the in-memory network), its
request handlers, its background tasks and, optionally, its HTTP health server.
It starts inside any running loop (a Jupyter kernel, a test, the
``macula-lab node`` process), binds port 0 unless told otherwise, and
``start()``/``stop()`` are idempotent: after ``stop()`` no task of the node is
left running.

Higher layers (the DHT, services) plug in by registering handlers for message
types with :meth:`Node.route` and procedures with :meth:`Node.procedure`, and by
starting their background work with :meth:`Node.spawn` so the node owns it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import resource
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from ..core.codec import DEFAULT_MAX_FRAME_SIZE
from ..core.endpoint import parse_endpoint
from ..core.messages import NODE_ID_SIZE, Frame, MessageType, new_id
from ..core.session import Identity, PeerInfo
from ..errors import HandlerError, MaculaError, NotStarted
from ..transport.base import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    Reply,
    RequestHandler,
    Transport,
)

log = logging.getLogger(__name__)

DEFAULT_REALM = "com.example.realm"
Procedure = Callable[[Any, PeerInfo], Any]  # returns the result, or an awaitable of it


class NoSuchProcedure(MaculaError):
    code = "no_such_procedure"


class Node:
    """A mesh node.  See the module docstring; typical use::

    node = Node(name="node-1", realm="com.test.lab", certs="./certs")
    await node.start()
    rtt = await node.ping(other.endpoint)
    await node.stop()
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        realm: str = DEFAULT_REALM,
        node_id: bytes | str | None = None,
        listen: str | None = "quic://127.0.0.1:0",
        advertise: str | None = None,
        tls: Any = None,
        certs: str | os.PathLike | None = None,
        network: Any = None,
        bootstrap: list[str] | tuple[str, ...] = (),
        health_listen: str | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        admin_token: str | None = None,
        k: int = 20,
        alpha: int = 3,
        query_timeout: float | None = None,
        cache_ttl: float = 60.0,
        strategy: str = "random",
        debug: bool = False,
        transport_options: dict[str, Any] | None = None,
    ):
        node_id = _coerce_node_id(node_id)
        self.name = name or f"node-{node_id.hex()[:8]}"
        self.identity = Identity(node_id=node_id, realm=realm, name=self.name)
        self.bootstrap = list(bootstrap)
        self.request_timeout = request_timeout
        self.admin_token = admin_token
        self._health_listen = health_listen
        self._health: Any = None
        self._handlers: dict[MessageType, RequestHandler] = {}
        self._peer_observers: list[Callable[[PeerInfo], None]] = []
        self._procedures: dict[str, Procedure] = {}
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._stopping = False
        self._ready = False
        self._start_lock: asyncio.Lock | None = None
        self.started_at: float | None = None
        self.transport = self._make_transport(
            listen=listen,
            advertise=advertise,
            tls=tls,
            certs=certs,
            network=network,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            max_frame_size=max_frame_size,
            options=transport_options or {},
        )
        self.route(MessageType.PING, self._on_ping)
        self.route(MessageType.CALL, self._on_call)
        self.procedure("macula.echo", _echo)
        self.procedure("macula.info", self._info_procedure)
        from .dht import DEFAULT_QUERY_TIMEOUT, Dht

        self.dht = Dht(self, k=k, alpha=alpha, query_timeout=query_timeout or DEFAULT_QUERY_TIMEOUT)
        from .services import Services

        self.debug = debug
        self.services = Services(self, cache_ttl=cache_ttl, strategy=strategy, debug=debug)
        from .gateway import ClientGateway

        self.gateway = ClientGateway(self)
        from .inspection import Inspector

        self.inspector = Inspector(self)

    # ------------------------------------------------------------ building
    def _make_transport(
        self,
        *,
        listen,
        advertise,
        tls,
        certs,
        network,
        request_timeout,
        connect_timeout,
        max_frame_size,
        options,
    ) -> Transport:
        if network is not None:
            from ..transport.memory import MemoryTransport

            return MemoryTransport(
                network,
                self.identity,
                request_timeout=request_timeout,
                connect_timeout=connect_timeout,
                max_frame_size=max_frame_size,
                **options,
            )
        from ..transport.quic import QuicTransport, TlsConfig

        if tls is None and certs is not None:
            tls = _issue_node_tls(Path(certs), self.name, listen, advertise)
        return QuicTransport(
            self.identity,
            listen=listen,
            advertise=advertise,
            tls=tls or TlsConfig(),
            max_frame_size=max_frame_size,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            **options,
        )

    @classmethod
    def from_config(cls, config: Any) -> Node:
        """Build a node from a :class:`macula_lab.deploy.config.NodeConfig`."""
        from ..transport.quic import TlsConfig

        tls = TlsConfig(cert=config.cert, key=config.key, ca=config.ca, verify=not config.insecure)
        return cls(
            name=config.name,
            realm=config.realm,
            node_id=config.node_id,
            listen=config.listen,
            advertise=config.advertise,  # None: derived from the bound address
            tls=tls,
            bootstrap=config.bootstrap,
            health_listen=config.health_listen if config.health_address else None,
            request_timeout=config.request_timeout,
            connect_timeout=config.connect_timeout,
            max_frame_size=config.max_frame_size,
            admin_token=config.admin_token,
            k=config.k,
            alpha=config.alpha,
        )

    # ----------------------------------------------------------- lifecycle
    @property
    def node_id(self) -> bytes:
        return self.identity.node_id

    @property
    def realm(self) -> str:
        return self.identity.realm

    @property
    def endpoint(self) -> str:
        return self.transport.endpoint

    @property
    def running(self) -> bool:
        return self._started

    @property
    def ready(self) -> bool:
        """Running, and (when it has bootstrap peers) joined the mesh."""
        joined = not self.bootstrap or len(self.dht.table) > 0
        return self._started and self._ready and joined

    def peer_info(self) -> PeerInfo:
        return self.identity.peer_info()

    async def start(self) -> Node:
        """Start listening (and the health server).  Idempotent; returns self."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return self
            await self.transport.start(self._dispatch)
            try:
                if self._health_listen:
                    await self._start_health()
            except BaseException:
                await self.transport.close()
                raise
            self._started = True
            self.started_at = time.monotonic()
            self.dht.start()
            self._ready = True
            if self.bootstrap:
                await self._join()
            log.info(
                "node %s started: realm=%s endpoint=%s id=%s",
                self.name,
                self.realm,
                self.endpoint,
                self.node_id.hex()[:16],
            )
        return self

    async def _join(self) -> None:
        """Bootstrap into the mesh; if no seed answers yet, keep trying in the background."""
        if await self.dht.bootstrap(self.bootstrap):
            return
        log.warning("node %s: no bootstrap peer reachable yet; retrying in the background", self.name)
        self.spawn(self._rejoin(), name=f"{self.name}:rejoin")

    async def _rejoin(self) -> None:
        delay = 1.0
        while not len(self.dht.table):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            await self.dht.bootstrap(self.bootstrap)

    async def stop(self) -> None:
        """Stop: cancel every task the node owns, close connections.  Idempotent."""
        await self._shut_down(graceful=True)

    async def kill(self) -> None:
        """Stop abruptly, without a goodbye to anyone: peers find out by timing out.

        The lab uses this to simulate a crashed host or a killed process.
        """
        await self._shut_down(graceful=False)

    async def _shut_down(self, *, graceful: bool) -> None:
        if self._start_lock is None:
            return
        async with self._start_lock:
            if not self._started:
                return
            await self._cancel_tasks()
            await (self.transport.close() if graceful else self.transport.abort())
            await self._finish_stop()
            log.info("node %s %s", self.name, "stopped" if graceful else "killed (no goodbye)")

    async def _cancel_tasks(self) -> None:
        self._ready = False
        self._stopping = True  # spawn() refuses from now on, so this loop ends
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _finish_stop(self) -> None:
        if self._health is not None:
            await self._health.stop()
            self._health = None
        self._started = False
        self._stopping = False

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task | None:
        """Run ``coro`` as a task owned by this node: cancelled on stop, failures logged.

        A node that is not running (or is stopping) starts nothing: returns None.
        """
        if not self._started or self._stopping:
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "node %s: background task %s failed", self.name, task.get_name(), exc_info=task.exception()
            )

    @property
    def tasks(self) -> set[asyncio.Task]:
        return set(self._tasks)

    # ------------------------------------------------------------ requests
    def route(self, mtype: MessageType, handler: RequestHandler) -> None:
        """Serve requests of ``mtype`` with ``handler`` (replaces any previous one)."""
        self._handlers[mtype] = handler

    def procedure(self, name: str, fn: Procedure) -> None:
        """Answer CALLs of ``name`` with ``fn(args, peer)`` (a function or a coroutine function).

        Plain functions are answered within the event-loop pass that received
        the call (no task): keep them short.  Coroutine functions run as tasks.
        """
        self._procedures[name] = (fn, inspect.iscoroutinefunction(fn))

    def remove_procedure(self, name: str) -> None:
        self._procedures.pop(name, None)

    # ----------------------------------------------------------- services
    async def advertise(
        self, name: str, handler: Callable[[Any], Any], *, ttl: float = 300, metadata: dict | None = None
    ):
        """Serve ``name`` and publish this node as a provider (see :mod:`macula_lab.runtime.services`)."""
        return await self.services.advertise(name, handler, ttl=ttl, metadata=metadata)

    async def unadvertise(self, name: str) -> int:
        return await self.services.unadvertise(name)

    async def discover(self, name: str, *, refresh: bool = False):
        return await self.services.discover(name, refresh=refresh)

    def call(
        self,
        name: str,
        args: Any = None,
        *,
        timeout: float = 5.0,
        strategy: str | None = None,
        max_attempts: int | None = None,
        deadline: float | None = None,
        details: bool = False,
    ) -> Awaitable[Any]:
        """Call service ``name`` (await it): its result, or the :class:`~macula_lab.runtime.services.CallResult` with ``details``.

        A plain method returning the services layer's coroutine: one await layer less on the hot path.
        """
        return self.services.call(
            name,
            args,
            timeout=timeout,
            strategy=strategy,
            max_attempts=max_attempts,
            deadline=deadline,
            details=details,
        )

    def observe_peers(self, fn: Callable[[PeerInfo], None]) -> None:
        """Call ``fn(peer)`` for every request received (the DHT learns contacts this way)."""
        self._peer_observers.append(fn)

    def _dispatch(self, frame: Frame, peer: PeerInfo) -> Reply | Awaitable[Reply]:
        for observe in self._peer_observers:
            observe(peer)
        handler = self._handlers.get(frame.type)
        if handler is None:
            raise UnknownRequest(f"this node does not serve {frame.type.name} requests")
        return handler(frame, peer)

    async def request(
        self, endpoint: str, mtype: MessageType, body: dict[str, Any], *, timeout: float | None = None
    ) -> Frame:
        if not self._started:
            raise NotStarted(f"node {self.name} is not started")
        return await self.transport.request(endpoint, mtype, body, timeout=timeout)

    def send_request(
        self,
        endpoint: str,
        mtype: MessageType,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
        notify: Callable[[], None] | None = None,
    ) -> asyncio.Future[Frame] | None:
        """:meth:`Transport.send_request`: send at once over an open session, or None."""
        if not self._started:
            raise NotStarted(f"node {self.name} is not started")
        return self.transport.send_request(endpoint, mtype, body, timeout=timeout, notify=notify)

    async def ping(self, endpoint: str, *, timeout: float | None = None) -> float:
        """Round-trip time of an app-level PING to ``endpoint`` (seconds)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await self.request(endpoint, MessageType.PING, {"id": new_id()}, timeout=timeout)
        return loop.time() - t0

    async def call_procedure(
        self, endpoint: str, procedure: str, args: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Call a procedure on the node at ``endpoint`` directly (no discovery)."""
        reply = await self.request(
            endpoint, MessageType.CALL, {"procedure": procedure, "args": args}, timeout=timeout
        )
        return reply.body["result"]

    def _on_ping(self, frame: Frame, peer: PeerInfo) -> Reply:
        return MessageType.PONG, {}

    def _on_call(self, frame: Frame, peer: PeerInfo) -> Reply | Awaitable[Reply]:
        name = frame.body["procedure"]
        entry = self._procedures.get(name)
        if entry is None:
            raise NoSuchProcedure(f"no procedure {name!r} on node {self.name}")
        fn, is_async = entry
        if is_async:
            return self._reply_later(fn(frame.body["args"], peer))
        try:
            result = fn(frame.body["args"], peer)
        except Exception as exc:  # the handler's failure, reported by name to the caller
            raise self._handler_error(exc) from exc
        if inspect.isawaitable(result):  # a plain function that returned a coroutine
            return self._reply_later(result)
        return MessageType.REPLY, {"result": result}

    async def _reply_later(self, pending: Awaitable[Any]) -> Reply:
        try:
            result = await pending
        except Exception as exc:  # the handler's failure, reported by name to the caller
            raise self._handler_error(exc) from exc
        return MessageType.REPLY, {"result": result}

    def _handler_error(self, exc: Exception) -> MaculaError:
        from .services import ServiceUnavailable

        if isinstance(exc, HandlerError | ServiceUnavailable):
            return exc  # already says what happened (a relayed handler, an unreachable client)
        details = {"type": type(exc).__name__, "message": str(exc)}
        if self.debug:  # no server stack traces unless asked for
            details["traceback"] = "".join(traceback.format_exception(exc))
        return HandlerError(f"{type(exc).__name__}: {exc}", details)

    async def _info_procedure(self, args: Any, peer: PeerInfo) -> dict[str, Any]:
        return self.status()

    # ------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        uptime = time.monotonic() - self.started_at if self.started_at else 0.0
        return {
            "name": self.name,
            "realm": self.realm,
            "node_id": self.node_id.hex(),
            "endpoint": self.endpoint,
            "running": self._started,
            "uptime_s": round(uptime, 3),
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self.status(),
            "tasks": len(self._tasks),
            "transport": self.transport.stats(),
            "dht": self.dht.stats(),
            "services": self.services.stats_dict(),
            "max_rss_bytes": _max_rss_bytes(),
        }

    async def _start_health(self) -> None:
        from ..deploy.config import parse_host_port
        from .health import HealthServer
        from .prometheus import node_registry

        host, port = parse_host_port(self._health_listen)
        self._health = HealthServer(
            host,
            port,
            status=self.status,
            ready=lambda: self.ready,
            registry=node_registry(self),
        )
        await self._health.start()

    @property
    def health_port(self) -> int | None:
        return self._health.port if self._health is not None else None

    def __repr__(self) -> str:
        state = "running" if self._started else "stopped"
        return f"<Node {self.name} {state} realm={self.realm} endpoint={self.endpoint or '-'}>"

    def _repr_html_(self) -> str:
        import html

        rows = {
            "state": "running" if self._started else "stopped",
            "realm": self.realm,
            "endpoint": self.endpoint or "-",
            "node id": self.node_id.hex()[:16] + "...",
            "contacts": len(self.dht.table),
            "stored keys": len(self.dht.records),
            "services": ", ".join(self.services.ads) or "-",
            "tasks": len(self._tasks),
        }
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in rows.items()
        )
        return f"<div class='macula-node'><strong>Node {html.escape(self.name)}</strong><table>{body}</table></div>"


class UnknownRequest(MaculaError):
    code = "unknown_request"


def _echo(args: Any, peer: PeerInfo) -> Any:
    return args


def _coerce_node_id(node_id: bytes | str | None) -> bytes:
    if node_id is None:
        return os.urandom(NODE_ID_SIZE)
    if isinstance(node_id, str):
        try:
            node_id = bytes.fromhex(node_id)
        except ValueError:
            raise ValueError(f"node_id must be {NODE_ID_SIZE * 2} hex characters") from None
    if len(node_id) != NODE_ID_SIZE:
        raise ValueError(f"node_id must be {NODE_ID_SIZE} bytes, got {len(node_id)}")
    return bytes(node_id)


def _issue_node_tls(directory: Path, name: str, listen: str | None, advertise: str | None) -> Any:
    """Make sure a lab CA exists in ``directory`` and issue this node's certificate."""
    from ..transport.certs import ensure_ca, issue_node_cert
    from ..transport.quic import TlsConfig

    dns: list[str] = []
    ips: list[str] = []
    for text in (listen, advertise):
        if not text:
            continue
        ep = parse_endpoint(text)
        if ep.host in ("0.0.0.0", "::"):
            continue
        (ips if ep.is_ip else dns).append(ep.host)
    ensure_ca(directory)
    return TlsConfig.from_node_cert(issue_node_cert(directory, name, dns=dns, ips=ips))


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
