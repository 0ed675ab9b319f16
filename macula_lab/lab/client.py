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

import math
from typing import Any

from ..core.messages import MessageType
from ..core.records import ProviderEntry
from ..errors import InvalidField, MaculaError, PeerError
from ..runtime.inspection import Unauthorized, check_sections
from ..runtime.node import Node
from ..runtime.services import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_TTL,
    AllProvidersFailed,
    Attempt,
    CallResult,
    CallTimeout,
    InvalidServiceName,
    RemoteError,
    ServiceNotFound,
    _adapt,
    _check_name,
)
from ..transport.quic import TlsConfig


async def connect(
    url: str,
    *,
    realm: str,
    node_id: bytes | str | None = None,
    ca: str | None = None,
    insecure: bool = False,
    name: str | None = None,
    timeout: float = 5.0,
    debug: bool = False,
) -> Client:
    """Attach to the node at ``url``; raises RealmMismatch, CertificateError, ConnectTimeout..."""
    node = Node(
        name=name,
        realm=realm,
        node_id=node_id,
        listen=None,
        tls=TlsConfig(ca=ca, verify=not insecure),
        connect_timeout=timeout,
        request_timeout=timeout,
        debug=debug,
        # the session must outlive quiet periods: pings keep it up until close()
        transport_options={"idle_timeout": math.inf},
    )
    await node.start()
    try:
        peer = await node.transport.connect(url)
    except BaseException:
        await node.stop()
        raise
    return Client(url, node, peer)


class Client:
    """The node API (advertise, unadvertise, discover, call) over a session to a remote node."""

    def __init__(self, url: str, node: Node, peer: Any):
        self.url = url
        self.node = node
        self.peer = peer  # the node we are attached to
        self.advertised: dict[str, float] = {}

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def node_id(self) -> bytes:
        return self.node.node_id

    async def _ask(self, mtype: MessageType, body: dict[str, Any], timeout: float | None = None):
        try:
            return await self.node.request(self.url, mtype, body, timeout=timeout)
        except PeerError as exc:
            raise _rebuild(exc) from None

    async def advertise(
        self, name: str, handler, *, ttl: float = DEFAULT_TTL, metadata: dict | None = None
    ) -> int:
        """Serve ``name`` from this process through the attached node; returns replica count."""
        _check_name(name)
        self.node.procedure(name, _adapt(handler))
        reply = await self._ask(
            MessageType.ADVERTISE,
            {"service": name, "ttl": float(ttl), "metadata": dict(metadata or {})},
            timeout=30.0,
        )
        self.advertised[name] = float(ttl)
        return reply.body["replicas"]

    async def unadvertise(self, name: str) -> int:
        reply = await self._ask(MessageType.UNADVERTISE, {"service": name}, timeout=30.0)
        self.node.remove_procedure(name)
        self.advertised.pop(name, None)
        return reply.body["removed"]

    async def discover(self, name: str, *, refresh: bool = False) -> list[ProviderEntry]:
        _check_name(name)
        reply = await self._ask(MessageType.DISCOVER, {"service": name, "refresh": refresh}, timeout=30.0)
        now = self.node.dht.now()
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
        _check_name(name)
        body: dict[str, Any] = {"service": name, "args": args, "timeout": float(timeout)}
        if strategy is not None:
            body["strategy"] = strategy
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        # the node's own deadline is timeout x attempts + 1 s; leave room for it to answer
        overall = timeout * (max_attempts or 3) + 3.0
        loop_t0 = self.node.dht.now()
        reply = await self._ask(MessageType.SERVICE_CALL, body, timeout=overall)
        b = reply.body
        if not details:
            return b["result"]
        return CallResult(
            name, b["result"], b["provider"], b["node_id"], "", self.node.dht.now() - loop_t0, (), False
        )

    async def inspect(self, token: str, sections: Any = None, since: float = 0.0) -> dict[str, Any]:
        """The attached node's state for the lab views (see :mod:`macula_lab.runtime.inspection`).

        Raises :class:`~macula_lab.runtime.inspection.Unauthorized` without the node's admin token.
        """
        body = {"token": token or "", "sections": list(check_sections(sections)), "since": float(since)}
        reply = await self._ask(MessageType.INSPECT, body, timeout=10.0)
        return reply.body["snapshot"]

    async def close(self) -> None:
        """Close the session: the node withdraws this client's advertisements."""
        await self.node.stop()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Client {self.name} attached to {self.url} ({len(self.advertised)} services)>"


def _rebuild(exc: PeerError) -> MaculaError:
    """Turn an ERROR from the node back into the service error it stands for."""
    d = exc.details or {}
    code = exc.remote_code
    if code == Unauthorized.code:
        return Unauthorized(exc.remote_message)
    if code == ServiceNotFound.code:
        return ServiceNotFound(exc.remote_message)
    if code == InvalidServiceName.code:
        return InvalidServiceName(exc.remote_message)
    if code == RemoteError.code:
        return RemoteError.from_details("?", "?", d, exc.remote_message)
    if code in (AllProvidersFailed.code, CallTimeout.code):
        attempts = [Attempt(**a) for a in d.get("attempts", []) if isinstance(a, dict)]
        cls = CallTimeout if code == CallTimeout.code else AllProvidersFailed
        err = cls(d.get("service", "?"), attempts)
        err.args = (exc.remote_message,)  # the node's own wording (it names the reason)
        return err
    return exc
