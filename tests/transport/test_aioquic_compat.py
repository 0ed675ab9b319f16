"""The aioquic internals the QUIC transport relies on still exist: an upgrade that changes one fails here.

Everything macula-lab takes from aioquic beyond its public API goes through
:mod:`macula_lab.transport.aioquic_compat`; these tests check each attribute it
names (``RELIED_ON``) on a real, mutually authenticated connection, and each
function's effect.
"""

from __future__ import annotations

from importlib.metadata import version

from aioquic import tls
from aioquic.quic.recovery import QuicPacketSpace
from packaging.specifiers import SpecifierSet

from macula_lab.transport import aioquic_compat as compat

from ..conftest import tls_for


def _pinned() -> SpecifierSet:
    from importlib.metadata import requires

    [spec] = [r for r in requires("macula-lab") if r.startswith("aioquic")]
    return SpecifierSet(spec.removeprefix("aioquic").split(";")[0])


def test_the_installed_aioquic_is_the_pinned_series():
    pinned = _pinned()
    assert str(pinned).startswith("~="), f"pyproject should pin aioquic with ~= (got {pinned})"
    assert version("aioquic") in pinned


async def test_every_attribute_relied_on_exists_on_a_real_connection(nodes, certs):
    a = await nodes("node-1")
    b = await nodes("node-2")
    await a.ping(b.endpoint)
    outgoing = a.transport.pool.peek(b.endpoint)
    [incoming] = [p for p in b.transport._incoming if p.peer and p.peer.node_id == a.node_id]
    objects = {
        "QuicConnection": incoming._quic,
        "tls.Context": incoming._quic.tls,
        "QuicPacketSpace": incoming._quic._spaces[tls.Epoch.ONE_RTT],
        "QuicConnectionProtocol": outgoing,
        "QuicServer": b.transport._server,
    }
    missing = [
        f"{kind}.{attr}"
        for kind, attrs in compat.RELIED_ON.items()
        for attr in attrs
        if not hasattr(objects[kind], attr)
    ]
    assert not missing, f"aioquic no longer has {missing}: update macula_lab/transport/aioquic_compat.py"
    assert isinstance(objects["QuicPacketSpace"], QuicPacketSpace)


async def test_the_server_sees_the_client_certificate_it_asked_for(nodes, certs):
    a = await nodes("node-1")
    b = await nodes("node-2")
    await a.ping(b.endpoint)
    [incoming] = [p for p in b.transport._incoming if p.peer and p.peer.node_id == a.node_id]
    cert, chain = compat.peer_certificate(incoming._quic)
    assert cert is not None, "request_client_certificate() no longer makes clients send a certificate"
    assert isinstance(chain, list)
    assert tls_for(certs, "node-1").cert  # (the certificate the client presented came from its files)


async def test_protocol_state_helpers(nodes):
    a = await nodes("node-1")
    b = await nodes("node-2")
    await a.ping(b.endpoint)
    conn = a.transport.pool.peek(b.endpoint)
    assert compat.datagram_transport(conn) is not None
    assert compat.protocol_closed(conn) is False
    assert compat.server_transport(b.transport._server).get_extra_info("socket") is not None
    compat.ack_with_next_packet(conn._quic, 0.0)  # no pending ACK or one due now: both fine
    space = conn._quic._spaces[tls.Epoch.ONE_RTT]
    assert space.ack_at is None or space.ack_at == 0.0


async def test_key_exchange_is_x25519(nodes):
    """One key share per ClientHello instead of four (P-384 alone costs about a millisecond)."""
    a = await nodes("node-1")
    b = await nodes("node-2")
    await a.ping(b.endpoint)
    conn = a.transport.pool.peek(b.endpoint)
    assert conn._quic.tls._supported_groups == [tls.Group.X25519]
    [incoming] = [p for p in b.transport._incoming if p.peer and p.peer.node_id == a.node_id]
    assert incoming._quic.tls._supported_groups[0] == tls.Group.X25519
