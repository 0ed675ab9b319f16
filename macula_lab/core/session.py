"""Session handshake (sans-I/O): CONNECT -> CONNECT_ACK or ERROR realm_mismatch.

Shared by every transport so that QUIC and the in-memory network behave the same.
The reference closed the stream silently on a realm mismatch while the client
believed it was connected; here the refusal is an explicit ERROR frame that the
caller turns into :class:`~macula_lab.errors.RealmMismatch`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidField, RealmMismatch
from .messages import PROTOCOL_VERSION, Frame, MessageType, new_id


@dataclass(frozen=True)
class PeerInfo:
    """Who is at the other end of a session (from its CONNECT or CONNECT_ACK)."""

    node_id: bytes
    realm: str
    name: str = ""
    endpoint: str = ""  # where the peer listens for requests; "" for pure clients
    capabilities: tuple[str, ...] = ()

    @property
    def short_id(self) -> str:
        return self.node_id.hex()[:12]


@dataclass
class Identity:
    """This node as it introduces itself."""

    node_id: bytes
    realm: str
    name: str = ""
    capabilities: tuple[str, ...] = ("dht", "rpc")
    endpoint: str = ""  # filled in once the transport is listening

    def peer_info(self) -> PeerInfo:
        return PeerInfo(self.node_id, self.realm, self.name, self.endpoint, tuple(self.capabilities))


def connect_body(me: Identity) -> dict[str, Any]:
    return {
        "id": new_id(),
        "version": PROTOCOL_VERSION,
        "node_id": me.node_id,
        "realm": me.realm,
        "capabilities": list(me.capabilities),
        "endpoint": me.endpoint,
        "name": me.name,
    }


def accept_connect(
    me: Identity, frame: Frame, *, now: float | None = None
) -> tuple[PeerInfo, MessageType, dict[str, Any]]:
    """Server side: judge a CONNECT.  Returns (peer, reply type, reply body).

    ``now`` is the epoch time the reply states (default: the system clock).
    On a realm mismatch the reply is an ERROR with code ``realm_mismatch``
    and ``peer`` describes the refused peer; the caller must not treat that
    session as established (check ``reply type``).
    """
    body = frame.body
    if body["version"] != PROTOCOL_VERSION:
        raise InvalidField(
            f"CONNECT.version {body['version']} unsupported (this node speaks {PROTOCOL_VERSION})"
        )
    peer = PeerInfo(
        node_id=body["node_id"],
        realm=body["realm"],
        name=str(body.get("name", "")),
        endpoint=str(body.get("endpoint", "")),
        capabilities=tuple(str(c) for c in body["capabilities"]),
    )
    if peer.realm != me.realm:
        return (
            peer,
            MessageType.ERROR,
            {
                "id": body["id"],
                "code": RealmMismatch.code,
                "message": f"this node serves realm {me.realm!r}, not {peer.realm!r}",
                "details": {"ours": me.realm, "theirs": peer.realm},
            },
        )
    return (
        peer,
        MessageType.CONNECT_ACK,
        {
            "id": body["id"],
            "node_id": me.node_id,
            "realm": me.realm,
            "capabilities": list(me.capabilities),
            "name": me.name,
            "server_time": time.time() if now is None else now,
        },
    )


def peer_from_ack(me: Identity, frame: Frame, endpoint: str) -> PeerInfo:
    """Client side: turn the answer to our CONNECT into a PeerInfo or raise RealmMismatch."""
    body = frame.body
    if frame.type is MessageType.ERROR:
        if body["code"] == RealmMismatch.code:
            theirs = (body.get("details") or {}).get("ours")
            raise RealmMismatch(
                f"{endpoint} refused the session: {body['message']}", ours=me.realm, theirs=theirs
            )
        from ..errors import IdentityMismatch, PeerError, Unauthenticated

        refusal = {Unauthenticated.code: Unauthenticated, IdentityMismatch.code: IdentityMismatch}.get(body["code"])
        if refusal is not None:
            raise refusal(f"{endpoint} refused the session: {body['message']}")
        raise PeerError(body["code"], body["message"], body.get("details"))
    if frame.type is not MessageType.CONNECT_ACK:
        raise InvalidField(f"expected CONNECT_ACK, got {frame.type.name}")
    if body["realm"] != me.realm:  # a buggy or hostile peer acking the wrong realm
        raise RealmMismatch(
            f"{endpoint} acknowledged realm {body['realm']!r}", ours=me.realm, theirs=body["realm"]
        )
    return PeerInfo(
        node_id=body["node_id"],
        realm=body["realm"],
        name=str(body.get("name", "")),
        endpoint=endpoint,
        capabilities=tuple(str(c) for c in body["capabilities"]),
    )
