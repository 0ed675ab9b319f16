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
import os
from typing import Any

from ..core import params
from ..core.messages import NODE_ID_SIZE, MessageType
from ..core.params import DEFAULT_CALL_TIMEOUT, DEFAULT_TTL
from ..core.records import ProviderEntry
from ..core.session import Identity, PeerInfo
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

    async def inspect(self, token: str, sections: Any = None, since: float = 0.0) -> dict[str, Any]:
        """The attached node's state for the lab views (see :mod:`macula_lab.runtime.inspection`).

        Raises :class:`~macula_lab.runtime.inspection.Unauthorized` without the node's admin token.
        """
        body = {"token": token or "", "sections": list(check_sections(sections)), "since": float(since)}
        reply = await self._ask(MessageType.INSPECT, body, timeout=10.0)
        return reply.body["snapshot"]

    async def close(self) -> None:
        """Close the session: the node withdraws this client's advertisements."""
        await self.host.stop()

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
