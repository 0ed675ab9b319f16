"""The node: one mesh node inside an already running asyncio loop, composed of its parts.

:class:`Node` is the one place that knows every part and wires them together:
a transport (QUIC, or the simulated network), a :class:`~.host.Host` over it
(request routing, procedures, tasks), the DHT, the services, the gateway for
attached clients, the inspector and, optionally, the HTTP health server.  The
parts only see the host and the small interfaces of :mod:`.interfaces`, never
the node, so none of them imports another's owner.

A node starts inside any running loop (a Jupyter kernel, a test, the
``macula-lab node`` process), binds port 0 unless told otherwise, and
``start()``/``stop()`` are idempotent: after ``stop()`` no task of the node is
left running.
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
import resource
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from ..core import entropy, params
from ..core.codec import DEFAULT_MAX_FRAME_SIZE
from ..core.endpoint import parse_endpoint, parse_host_port
from ..core.messages import NODE_ID_SIZE, Frame, MessageType
from ..core.session import Identity, PeerInfo
from ..errors import InvalidField
from ..transport.base import RequestHandler, Transport
from .dht import Dht
from .gateway import ClientGateway
from .host import Host, Procedure
from .inspection import Inspector
from .services import Advertisement, Services
from .watch import DEFAULT_MAX_INTERVAL, Watch, Watches

log = logging.getLogger(__name__)

DEFAULT_REALM = params.DEFAULT_REALM


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
        realm: str = params.DEFAULT_REALM,
        node_id: bytes | str | None = None,
        listen: str | None = "quic://127.0.0.1:0",
        advertise: str | None = None,
        tls: Any = None,
        certs: str | os.PathLike | None = None,
        network: Any = None,
        bootstrap: list[str] | tuple[str, ...] = (),
        health_listen: str | None = None,
        request_timeout: float = params.DEFAULT_REQUEST_TIMEOUT,
        connect_timeout: float = params.DEFAULT_CONNECT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        admin_token: str | None = None,
        k: int = params.DEFAULT_K,
        alpha: int = params.DEFAULT_ALPHA,
        query_timeout: float | None = None,
        cache_ttl: float = params.DEFAULT_CACHE_TTL,
        readvertise_fraction: float = params.READVERTISE_FRACTION,
        strategy: str = params.DEFAULT_STRATEGY,
        watch_interval: float = DEFAULT_MAX_INTERVAL,
        debug: bool = False,
        transport_options: dict[str, Any] | None = None,
    ):
        node_id = None if node_id is None else params.check_node_id(node_id)
        bound = tls.bound_node_id() if tls is not None and tls.cert else None
        if bound is not None:  # the certificate says who this node is
            if node_id is not None and node_id != bound:
                raise InvalidField(
                    f"node_id: the certificate binds {bound.hex()[:12]}, not {node_id.hex()[:12]}", field="node_id"
                )
            node_id = bound
        node_id = node_id or entropy.randbytes(NODE_ID_SIZE)
        name = params.check_node_name(name) if name is not None else f"node-{node_id.hex()[:8]}"
        params.check_realm(realm)
        request_timeout = params.check_timeout(request_timeout, "request_timeout")
        connect_timeout = params.check_timeout(connect_timeout, "connect_timeout")
        query_timeout = params.check_timeout(
            params.DEFAULT_QUERY_TIMEOUT if query_timeout is None else query_timeout, "query_timeout"
        )
        if admin_token is not None and not isinstance(admin_token, str):
            raise InvalidField("admin_token: must be text", field="admin_token")
        self.name = name
        self.identity = Identity(node_id=node_id, realm=realm, name=name)
        self.bootstrap = [str(parse_endpoint(b)) for b in bootstrap]
        self.request_timeout = request_timeout
        self.admin_token = admin_token
        self.debug = debug
        self._health_listen = health_listen
        self._health: Any = None
        self._ready = False
        self._start_lock: asyncio.Lock | None = None
        transport = make_transport(
            self.identity,
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
        # the composition: every part gets the host and what it needs of the others, no more
        self.host = Host(self.identity, transport, request_timeout=request_timeout, debug=debug)
        self.dht = Dht(self.host, k=k, alpha=alpha, query_timeout=query_timeout)
        self.services = Services(
            self.host,
            self.dht,
            cache_ttl=cache_ttl,
            strategy=strategy,
            debug=debug,
            readvertise_fraction=readvertise_fraction,
        )
        self.watches = Watches(self.host, self.dht, max_interval=params.check_timeout(watch_interval, "watch_interval"))
        self.gateway = ClientGateway(self.host, self.services, self.watches)
        self.inspector = Inspector(
            self.host, self.dht, self.services, status=self.status, ready=lambda: self.ready, token=admin_token
        )
        self.host.procedure("macula.echo", _echo)
        self.host.procedure("macula.info", self._info_procedure)

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

    # ----------------------------------------------------------- identity
    @property
    def transport(self) -> Transport:
        return self.host.transport

    @property
    def node_id(self) -> bytes:
        return self.identity.node_id

    @property
    def realm(self) -> str:
        return self.identity.realm

    @property
    def endpoint(self) -> str:
        return self.host.endpoint

    @property
    def running(self) -> bool:
        return self.host.running

    @property
    def started_at(self) -> float | None:
        return self.host.started_at

    @property
    def ready(self) -> bool:
        """Running, and (when it has bootstrap peers) joined the mesh."""
        joined = not self.bootstrap or len(self.dht.table) > 0
        return self.running and self._ready and joined

    def peer_info(self) -> PeerInfo:
        return self.identity.peer_info()

    # ----------------------------------------------------------- lifecycle
    async def start(self) -> Node:
        """Start listening (and the health server), then join the mesh.  Idempotent; returns self."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.running:
                return self
            await self.host.start()
            try:
                if self._health_listen:
                    await self._start_health()
            except BaseException:
                await self.host.stop()
                raise
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
        self.host.spawn(self._rejoin(), name=f"{self.name}:rejoin")

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
            if not self.running:
                return
            self._ready = False
            await self.host.stop(graceful=graceful)
            if self._health is not None:
                await self._health.stop()
                self._health = None
            log.info("node %s %s", self.name, "stopped" if graceful else "killed (no goodbye)")

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -------------------------------------------- the host's API, for users
    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task | None:
        """Run ``coro`` as a task owned by this node (see :meth:`Host.spawn`)."""
        return self.host.spawn(coro, name=name)

    @property
    def tasks(self) -> set[asyncio.Task]:
        return self.host.tasks

    def route(self, mtype: MessageType, handler: RequestHandler) -> None:
        """Serve requests of ``mtype`` with ``handler`` (replaces any previous one)."""
        self.host.route(mtype, handler)

    def procedure(self, name: str, fn: Procedure) -> None:
        """Answer CALLs of ``name`` with ``fn(args, peer)`` (see :meth:`Host.procedure`)."""
        self.host.procedure(name, fn)

    def remove_procedure(self, name: str) -> None:
        self.host.remove_procedure(name)

    def observe_peers(self, fn: Callable[[PeerInfo], None]) -> None:
        self.host.observe_peers(fn)

    async def request(
        self, endpoint: str, mtype: MessageType, body: dict[str, Any], *, timeout: float | None = None
    ) -> Frame:
        return await self.host.request(endpoint, mtype, body, timeout=timeout)

    def send_request(
        self,
        endpoint: str,
        mtype: MessageType,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
        notify: Callable[[], None] | None = None,
    ) -> asyncio.Future[Frame] | None:
        return self.host.send_request(endpoint, mtype, body, timeout=timeout, notify=notify)

    async def ping(self, endpoint: str, *, timeout: float | None = None) -> float:
        """Round-trip time of an app-level PING to ``endpoint`` (seconds)."""
        return await self.host.ping(endpoint, timeout=timeout)

    async def call_procedure(
        self, endpoint: str, procedure: str, args: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Call a procedure on the node at ``endpoint`` directly (no discovery)."""
        return await self.host.call_procedure(endpoint, procedure, args, timeout=timeout)

    # ----------------------------------------------------------- services
    async def advertise(
        self,
        name: str,
        handler: Callable[[Any], Any],
        *,
        ttl: float = params.DEFAULT_TTL,
        metadata: dict | None = None,
    ) -> Advertisement:
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
        timeout: float = params.DEFAULT_CALL_TIMEOUT,
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

    def watch(self, name: str, *, since: int | None = None) -> Watch:
        """Watch service ``name``'s providers: ``async for event in node.watch(name)`` (see :mod:`.watch`).

        Events: ``reset`` (the whole set, first), then ``added``, ``updated``,
        ``removed``, ``expired``, each with the provider and an increasing
        ``index``; ``since=index`` resumes after that index.
        """
        return self.watches.watch(name, since=since)

    async def _info_procedure(self, args: Any, peer: PeerInfo) -> dict[str, Any]:
        return self.status()

    # ------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        started = self.host.started_at
        uptime = asyncio.get_running_loop().time() - started if started and self.running else 0.0
        return {
            "name": self.name,
            "realm": self.realm,
            "node_id": self.node_id.hex(),
            "endpoint": self.endpoint,
            "running": self.running,
            "uptime_s": round(uptime, 3),
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self.status(),
            "tasks": len(self.host.tasks),
            "transport": self.transport.stats(),
            "dht": self.dht.stats(),
            "services": self.services.stats_dict(),
            "watches": self.watches.stats(),
            "max_rss_bytes": _max_rss_bytes(),
        }

    async def _start_health(self) -> None:
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
        state = "running" if self.running else "stopped"
        return f"<Node {self.name} {state} realm={self.realm} endpoint={self.endpoint or '-'}>"

    def _repr_html_(self) -> str:
        rows = {
            "state": "running" if self.running else "stopped",
            "realm": self.realm,
            "endpoint": self.endpoint or "-",
            "node id": self.node_id.hex()[:16] + "...",
            "contacts": len(self.dht.table),
            "stored keys": len(self.dht.records),
            "services": ", ".join(self.services.ads) or "-",
            "tasks": len(self.host.tasks),
        }
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in rows.items()
        )
        return f"<div class='macula-node'><strong>Node {html.escape(self.name)}</strong><table>{body}</table></div>"


def make_transport(
    identity: Identity,
    *,
    listen: str | None,
    advertise: str | None = None,
    tls: Any = None,
    certs: str | os.PathLike | None = None,
    network: Any = None,
    request_timeout: float = params.DEFAULT_REQUEST_TIMEOUT,
    connect_timeout: float = params.DEFAULT_CONNECT_TIMEOUT,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    options: dict[str, Any] | None = None,
) -> Transport:
    """The transport a node (or an attached client: ``listen=None``) runs on.

    ``network``: a :class:`~macula_lab.transport.memory.MemoryNetwork` (the
    simulated network); otherwise QUIC with ``tls`` (or a certificate issued
    from the lab CA in ``certs``).
    """
    options = options or {}
    if network is not None:
        from ..transport.memory import MemoryTransport

        return MemoryTransport(
            network,
            identity,
            listen=listen is not None,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            max_frame_size=max_frame_size,
            **options,
        )
    from ..transport.quic import QuicTransport, TlsConfig

    if tls is None and certs is not None:
        tls = _issue_node_tls(Path(certs), identity, listen, advertise)
    return QuicTransport(
        identity,
        listen=listen,
        advertise=advertise,
        tls=tls or TlsConfig(),
        max_frame_size=max_frame_size,
        request_timeout=request_timeout,
        connect_timeout=connect_timeout,
        **options,
    )


def _echo(args: Any, peer: PeerInfo) -> Any:
    return args


def _issue_node_tls(directory: Path, identity: Identity, listen: str | None, advertise: str | None) -> Any:
    """Make sure a lab CA exists in ``directory`` and issue this node's certificate (or a client's).

    A node's certificate binds its id and names the hosts it listens and
    advertises on; a pure client (no ``listen``) gets a client certificate.
    """
    from ..transport.certs import ensure_ca, issue_client_cert, issue_node_cert
    from ..transport.quic import TlsConfig

    ensure_ca(directory)
    if listen is None:
        return TlsConfig.from_node_cert(issue_client_cert(directory, identity.name, node_id=identity.node_id))

    dns: list[str] = []
    ips: list[str] = []
    for text in (listen, advertise):
        if not text:
            continue
        ep = parse_endpoint(text)
        if ep.host in ("0.0.0.0", "::"):
            continue
        (ips if ep.is_ip else dns).append(ep.host)
    cert = issue_node_cert(directory, identity.name, dns=dns, ips=ips, node_id=identity.node_id)
    return TlsConfig.from_node_cert(cert)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
