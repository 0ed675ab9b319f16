"""Everything the QUIC transport takes from aioquic beyond its public API, in one place.

aioquic keeps a few things private that the transport needs: client
certificates (requested and read back), sending an ACK with the next packet,
and some state of its asyncio protocol and server.  Each use is one small
function here, so an aioquic release that changes one breaks this module, and
``tests/transport/test_aioquic_compat.py`` (which checks every attribute named
in :data:`RELIED_ON` on a real connection) fails loudly, instead of a node
failing somewhere at run time.  pyproject pins ``aioquic~=1.7``.

The protocol attributes ``_quic``, ``_loop`` and ``_transport`` that aioquic's
own examples use from subclasses are used that way by
:class:`~.quic.MaculaProtocol` too; they are listed in :data:`RELIED_ON`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aioquic import tls
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.connection import QuicConnection

#: (object, attribute) pairs this module and MaculaProtocol rely on; the compat test checks them all
RELIED_ON = {
    "QuicConnection": ("_spaces", "_initialize", "tls"),
    "tls.Context": (
        "_peer_certificate",
        "_peer_certificate_chain",
        "_request_client_certificate",
        "_supported_groups",
    ),
    "QuicPacketSpace": ("ack_at",),
    "QuicConnectionProtocol": ("_quic", "_loop", "_transport", "_closed", "_connected_waiter", "_timer"),
    "QuicServer": ("_transport",),
}


def ack_with_next_packet(quic: QuicConnection, now: float) -> None:
    """Send the pending ACK (1-RTT space) with the next packet instead of 1 ms later on its own."""
    space = quic._spaces.get(tls.Epoch.ONE_RTT)
    if space is not None and space.ack_at is not None:
        space.ack_at = now


def request_client_certificate(quic: QuicConnection) -> None:
    """Make this server connection ask the client for its certificate (TLS CertificateRequest).

    aioquic supports client certificates in its TLS layer but exposes the switch
    only as a private flag of the TLS context, which exists once the first
    Initial packet arrives; it is set right there.  A client without a
    certificate answers with an empty one and the handshake goes on (RFC 8446
    4.4.2.4); the transport judges the chain itself.
    """
    initialize = quic._initialize

    def _initialize(peer_cid: bytes) -> None:
        initialize(peer_cid)
        quic.tls._request_client_certificate = True

    quic._initialize = _initialize


def prefer_x25519(quic: QuicConnection) -> None:
    """Key exchange over X25519: a client offers that one key share, a server prefers it.

    aioquic offers P-256, P-384, X25519 and X448 shares in every ClientHello
    (four key generations, eight with a QUIC Retry; P-384 alone costs about a
    millisecond) and a server picks P-256 first.  Every macula-lab peer speaks
    X25519, the fastest of them; a server still accepts P-256 from others.
    """
    initialize = quic._initialize

    def _initialize(peer_cid: bytes) -> None:
        initialize(peer_cid)
        groups = [tls.Group.X25519] if quic.configuration.is_client else [tls.Group.X25519, tls.Group.SECP256R1]
        quic.tls._supported_groups = groups

    quic._initialize = _initialize


def peer_certificate(quic: QuicConnection) -> tuple[Any, list[Any]]:
    """The certificate (and chain) the peer presented, ``(None, [])`` if none."""
    context = getattr(quic, "tls", None)
    if context is None:
        return None, []
    return context._peer_certificate, list(context._peer_certificate_chain or [])


def datagram_transport(proto: QuicConnectionProtocol) -> asyncio.DatagramTransport | None:
    """The UDP transport under a connection (None before it is connected)."""
    return proto._transport


def protocol_closed(proto: QuicConnectionProtocol) -> bool:
    """Whether aioquic considers the connection closed (its ``wait_closed`` would return)."""
    return proto._closed.is_set()


def drop_connected_waiter(proto: QuicConnectionProtocol) -> None:
    """Forget the handshake waiter of a connection we gave up on.

    aioquic fails this future when a connection that never completed its
    handshake terminates; nobody awaits it any more once we gave up.
    """
    waiter = proto._connected_waiter
    if waiter is not None and not waiter.done():
        waiter.cancel()
    proto._connected_waiter = None


def stop_timer(proto: QuicConnectionProtocol) -> None:
    """Cancel the connection's QUIC timer (a crash: no more retransmissions or close frames)."""
    if proto._timer is not None:
        proto._timer.cancel()
        proto._timer = None


def server_transport(server: QuicServer) -> asyncio.DatagramTransport:
    """The listening UDP transport of a server (its socket, or to close it without goodbyes)."""
    return server._transport
