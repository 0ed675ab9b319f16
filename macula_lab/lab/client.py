"""Attached clients: use a node running elsewhere (container, pod, host) from this process.

    client = await macula_lab.connect("quic://node-1.lab:9443", realm="com.test.lab", ca="certs/ca.pem")
    await client.advertise("math.add", lambda a: a["a"] + a["b"])   # runs HERE when called
    await client.call("math.add", {"a": 1, "b": 2})
    await client.close()                                             # the node withdraws math.add

The client opens one session to the node (TLS verified against the lab CA) and
keeps it alive with pings.  Services it advertises are published by the node,
which relays each call to the client over that session, so the client needs no
reachable address (a notebook outside a k3s cluster works through a NodePort).
Discovery and calls run on the node (cache, selection, failover), and errors
come back with the same names as on a node.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
from typing import Any

from ..core import params
from ..core.messages import NODE_ID_SIZE, Frame, MessageType
from ..core.params import DEFAULT_CALL_TIMEOUT, DEFAULT_TTL
from ..core.records import ProviderEntry
from ..core.session import Identity, PeerInfo
from ..core.watch import WatchEvent
from ..errors import InvalidField, MaculaError, PeerError, QuotaExceeded
from ..runtime.gateway import ServiceOwnedElsewhere
from ..runtime.host import Host, as_procedure
from ..runtime.inspection import Unauthorized, check_sections
from ..runtime.node import make_transport
from ..runtime.services import (
    AllProvidersFailed,
    Attempt,
    CallResult,
    CallTimeout,
    RemoteError,
    ServiceNotFound,
)
from ..transport.quic import TlsConfig

#: in a certificate directory (``certs=``), the files an attached client uses
CLIENT_CERT_NAME = "lab"


async def connect(
    url: str,
    *,
    realm: str = params.DEFAULT_REALM,
    node_id: bytes | str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    certs: str | os.PathLike | None = None,
    insecure: bool = False,
    name: str | None = None,
    timeout: float = 5.0,
    debug: bool = False,
    network: Any = None,
) -> Client:
    """Attach to the node at ``url``; raises RealmMismatch, CertificateError, ConnectTimeout...

    Nodes accept sessions only from holders of a certificate of their lab CA:
    ``cert``/``key`` (a client certificate, ``macula-lab certs issue-client``)
    and ``ca`` to verify the node, or ``certs=DIR`` for ``DIR/ca.pem``,
    ``DIR/lab.pem`` and ``DIR/lab.key``.  The certificate binds the client's
    id.  ``insecure=True`` verifies nothing (and a node accepts it only when it
    runs insecure too).  ``network``: attach over the simulated network (a
    :class:`~macula_lab.transport.memory.MemoryNetwork`) instead of QUIC.
    """
    params.check_realm(realm)
    timeout = params.check_timeout(timeout)
    tls = None if network is not None else client_tls(ca=ca, cert=cert, key=key, certs=certs, insecure=insecure)
    bound = tls.bound_node_id() if tls is not None else None
    if bound is not None:
        if node_id is not None and params.check_node_id(node_id) != bound:
            raise InvalidField("node_id: the client certificate binds another id", field="node_id")
        node_id = bound
    node_id = os.urandom(NODE_ID_SIZE) if node_id is None else params.check_node_id(node_id)
    name = params.check_node_name(name) if name is not None else f"client-{node_id.hex()[:8]}"
    identity = Identity(node_id=node_id, realm=realm, name=name)
    transport = make_transport(
        identity,
        listen=None,
        tls=tls,
        network=network,
        connect_timeout=timeout,
        request_timeout=timeout,
        # the session must outlive quiet periods: pings keep it up until close()
        options={} if network is not None else {"idle_timeout": math.inf},
    )
    host = Host(identity, transport, request_timeout=timeout, debug=debug)
    await host.start()
    try:
        peer = await host.connect(url)
    except BaseException:
        await host.stop()
        raise
    return Client(url, host, peer)


def client_tls(
    *, ca: str | None, cert: str | None, key: str | None, certs: str | os.PathLike | None, insecure: bool
) -> TlsConfig:
    """The TLS files of an attached client (``certs=DIR``: ``ca.pem``, ``lab.pem``, ``lab.key`` there).

    Without ``cert``/``key``, a ``lab.pem``/``lab.key`` pair beside ``ca`` is
    used: deployments hand labs the three files together (the certs volume of
    the compose file, the k3s Secret, ``macula-lab certs issue-client``).
    """
    if certs is None and ca and not cert and not key and not insecure:
        beside = os.path.dirname(ca) or "."
        if os.path.isfile(os.path.join(beside, f"{CLIENT_CERT_NAME}.pem")):
            certs = beside
    if certs is not None:
        ca = ca or os.path.join(certs, "ca.pem")
        cert = cert or os.path.join(certs, f"{CLIENT_CERT_NAME}.pem")
        key = key or os.path.join(certs, f"{CLIENT_CERT_NAME}.key")
    if bool(cert) != bool(key):
        raise InvalidField("cert: a client certificate needs its key (cert= and key=)", field="cert")
    for field, path in (("ca", ca), ("cert", cert), ("key", key)):
        if path and not os.path.isfile(path):  # a missing local file is not worth a retry
            raise InvalidField(f"{field}: no such file {path}", field=field)
    return TlsConfig(cert=cert, key=key, ca=ca, verify=not insecure)


class Client:
    """The node API (advertise, unadvertise, discover, call) over a session to a remote node."""

    def __init__(self, url: str, host: Host, peer: PeerInfo):
        self.url = url
        self.host = host
        self.peer = peer  # the node we are attached to
        self.advertised: dict[str, float] = {}
        self.watches: dict[int, ClientWatch] = {}
        host.route(MessageType.SERVICE_EVENT, self._on_service_event)

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def node_id(self) -> bytes:
        return self.host.node_id

    @property
    def running(self) -> bool:
        return self.host.running

    async def _ask(self, mtype: MessageType, body: dict[str, Any], timeout: float | None = None):
        try:
            return await self.host.request(self.url, mtype, body, timeout=timeout)
        except PeerError as exc:
            raise _rebuild(exc) from None

    async def advertise(
        self, name: str, handler, *, ttl: float = DEFAULT_TTL, metadata: dict | None = None
    ) -> int:
        """Serve ``name`` from this process through the attached node; returns replica count."""
        params.check_service_name(name)
        ttl = params.check_ttl(ttl)
        metadata = params.check_metadata(metadata)
        if not callable(handler):
            raise TypeError("handler must be callable (args) -> result")
        self.host.procedure(name, as_procedure(handler))
        try:
            reply = await self._ask(
                MessageType.ADVERTISE, {"service": name, "ttl": ttl, "metadata": dict(metadata)}, timeout=30.0
            )
        except BaseException:
            if name not in self.advertised:  # refused: this process serves nothing new either
                self.host.remove_procedure(name)
            raise
        self.advertised[name] = ttl
        return reply.body["replicas"]

    async def unadvertise(self, name: str) -> int:
        reply = await self._ask(MessageType.UNADVERTISE, {"service": name}, timeout=30.0)
        self.host.remove_procedure(name)
        self.advertised.pop(name, None)
        return reply.body["removed"]

    async def discover(self, name: str, *, refresh: bool = False) -> list[ProviderEntry]:
        params.check_service_name(name)
        reply = await self._ask(MessageType.DISCOVER, {"service": name, "refresh": refresh}, timeout=30.0)
        now = self.host.now()
        out = []
        for item in reply.body["providers"]:
            try:
                entry = ProviderEntry.from_wire(item)
            except InvalidField:
                continue
            out.append(
                ProviderEntry(
                    entry.node_id, entry.endpoint, entry.metadata, entry.ttl, entry.seq, now + entry.ttl
                )
            )
        return out

    async def call(
        self,
        name: str,
        args: Any = None,
        *,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        strategy: str | None = None,
        max_attempts: int | None = None,
        details: bool = False,
    ) -> Any:
        """Call ``name`` through the attached node (which discovers, selects and fails over)."""
        params.check_service_name(name)
        body: dict[str, Any] = {"service": name, "args": args, "timeout": params.check_timeout(timeout)}
        if strategy is not None:
            body["strategy"] = strategy
        if max_attempts is not None:
            body["max_attempts"] = params.check_attempts(max_attempts)
        # the node's own deadline is timeout x attempts + 1 s; leave room for it to answer
        overall = timeout * (max_attempts or 3) + 3.0
        loop_t0 = self.host.now()
        reply = await self._ask(MessageType.SERVICE_CALL, body, timeout=overall)
        b = reply.body
        if not details:
            return b["result"]
        return CallResult(
            name, b["result"], b["provider"], b["node_id"], "", self.host.now() - loop_t0, (), False
        )

    def watch(self, name: str, *, since: int | None = None) -> ClientWatch:
        """Watch service ``name`` through the attached node: ``async for event in client.watch(name)``.

        The node runs the watch and relays its events over this session (see
        :meth:`macula_lab.runtime.node.Node.watch`).  After a reconnect, resume
        with ``since=`` the last ``index`` received (``watch.index``): the node
        replays what it still holds, or starts with a ``reset``.
        """
        params.check_service_name(name)
        if since is not None:
            since = params.check_watch_index(since, "since")
        return ClientWatch(self, name, since)

    def _on_service_event(self, frame: Frame, peer: PeerInfo):
        watch = self.watches.get(frame.body["watch"])
        if watch is None or watch.closed or peer.node_id != self.peer.node_id:
            return MessageType.SERVICE_EVENT_REPLY, {"ok": False}
        for item in frame.body["events"]:
            try:
                watch.deliver(WatchEvent.from_wire(item))
            except InvalidField:
                continue
        return MessageType.SERVICE_EVENT_REPLY, {"ok": not watch.closed}

    async def inspect(self, token: str, sections: Any = None, since: float = 0.0) -> dict[str, Any]:
        """The attached node's state for the lab views (see :mod:`macula_lab.runtime.inspection`).

        Raises :class:`~macula_lab.runtime.inspection.Unauthorized` without the node's admin token.
        """
        body = {"token": token or "", "sections": list(check_sections(sections)), "since": float(since)}
        reply = await self._ask(MessageType.INSPECT, body, timeout=10.0)
        return reply.body["snapshot"]

    async def close(self) -> None:
        """Close the session: the node withdraws this client's advertisements and ends its watches."""
        for watch in list(self.watches.values()):
            watch.close()
        await self.host.stop()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Client {self.name} attached to {self.url} ({len(self.advertised)} services)>"


class ClientWatch:
    """A watch run by the attached node (see :meth:`Client.watch`); the same events as a node's watch."""

    #: events held for a consumer that does not keep up; beyond, the watch ends (resume with ``since``)
    MAX_PENDING = 10_000
    #: seconds without an event after which the session is checked
    SESSION_CHECK = 1.0

    def __init__(self, client: Client, service: str, since: int | None):
        self.client = client
        self.service = service
        self.index: int | None = since  # the last index yielded
        self.id = random.getrandbits(62)  # chosen here: events may overtake the node's reply
        self.closed = False
        self.lost = False  # the session to the node ended under the watch
        self._since = since
        self._started = False
        self._last = since  # the last index received (duplicates after a resume are dropped)
        self._queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()

    async def start(self) -> ClientWatch:
        """Ask the node to run the watch (done by the first ``next``; raises what the node refused)."""
        if not self._started:
            self._started = True
            self.client.watches[self.id] = self
            body: dict[str, Any] = {"service": self.service, "watch": self.id}
            if self._since is not None:
                body["after"] = self._since
            try:
                await self.client._ask(MessageType.SERVICE_WATCH, body, timeout=30.0)
            except BaseException:
                self.close()
                raise
        return self

    def deliver(self, event: WatchEvent) -> None:
        if self.closed or (event.kind != "reset" and self._last is not None and event.index <= self._last):
            return
        self._last = event.index
        self._queue.put_nowait(event)
        if self._queue.qsize() > self.MAX_PENDING:
            self.close()

    def __aiter__(self) -> ClientWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        event = await self.next()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event (None once the watch ended); TimeoutError after ``timeout`` seconds.

        The watch also ends when the session to the node is gone (``lost`` is
        then True): reconnect and resume with ``since=watch.index``.
        """
        async with asyncio.timeout(timeout):
            await self.start()
            while True:
                if self.closed and self._queue.empty():
                    return None
                try:
                    async with asyncio.timeout(self.SESSION_CHECK):
                        event = await self._queue.get()
                    break
                except TimeoutError:
                    # quiet: is the session still there?  (no event could come over a closed one)
                    if self.client.host.session(self.client.url) is None:
                        self.lost = True
                        self.close()
        if event is not None:
            self.index = event.index
        return event

    def close(self) -> None:
        """Stop: the node ends the watch when it next relays an event (or when the session ends)."""
        if not self.closed:
            self.closed = True
            self.client.watches.pop(self.id, None)
            self._queue.put_nowait(None)

    async def __aenter__(self) -> ClientWatch:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ClientWatch {self.service} index={self.index}{' closed' if self.closed else ''}>"


def _rebuild(exc: PeerError) -> MaculaError:
    """Turn an ERROR from the node back into the service error it stands for."""
    d = exc.details or {}
    code = exc.remote_code
    simple = _BY_CODE.get(code)
    if simple is not None:
        return simple(exc.remote_message)
    if code == InvalidField.code:
        return InvalidField(exc.remote_message, field=d.get("field"))
    if code == RemoteError.code:
        return RemoteError.from_details("?", "?", d, exc.remote_message)
    if code in (AllProvidersFailed.code, CallTimeout.code):
        attempts = [Attempt(**a) for a in d.get("attempts", []) if isinstance(a, dict)]
        cls = CallTimeout if code == CallTimeout.code else AllProvidersFailed
        err = cls(d.get("service", "?"), attempts)
        err.args = (exc.remote_message,)  # the node's own wording (it names the reason)
        return err
    return exc


#: errors that cross the wire with nothing but their message
_BY_CODE: dict[str, type[MaculaError]] = {
    cls.code: cls for cls in (Unauthorized, ServiceNotFound, ServiceOwnedElsewhere, QuotaExceeded)
}
