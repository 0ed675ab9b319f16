import pytest

from macula_lab.core.messages import Frame, MessageType
from macula_lab.core.session import Identity, accept_connect, connect_body, peer_from_ack
from macula_lab.errors import InvalidField, PeerError, RealmMismatch


def _ident(realm="com.a", name="n"):
    return Identity(node_id=bytes(range(32)), realm=realm, name=name, endpoint="quic://h:1")


def test_same_realm_is_acknowledged_with_identity():
    client, server = _ident(name="c"), _ident(name="s")
    req = Frame(MessageType.CONNECT, connect_body(client))
    peer, mtype, body = accept_connect(server, req)
    assert mtype is MessageType.CONNECT_ACK and body["id"] == req.body["id"]
    assert peer.name == "c" and peer.endpoint == "quic://h:1"
    info = peer_from_ack(client, Frame(mtype, body), "quic://s:1")
    assert info.name == "s" and info.endpoint == "quic://s:1"


def test_realm_mismatch_is_explicit_on_both_sides():
    client, server = _ident("com.a"), _ident("com.b")
    _, mtype, body = accept_connect(server, Frame(MessageType.CONNECT, connect_body(client)))
    assert mtype is MessageType.ERROR and body["code"] == "realm_mismatch"
    with pytest.raises(RealmMismatch) as err:
        peer_from_ack(client, Frame(mtype, body), "quic://s:1")
    assert err.value.theirs == "com.b"


def test_other_errors_and_wrong_versions():
    client = _ident()
    with pytest.raises(PeerError):
        peer_from_ack(
            client, Frame(MessageType.ERROR, {"id": b"\0" * 16, "code": "busy", "message": "x"}), "e"
        )
    bad = connect_body(client) | {"version": 9}
    with pytest.raises(InvalidField):
        accept_connect(client, Frame(MessageType.CONNECT, bad))
    lying_ack = {"id": b"\0" * 16, "node_id": b"\1" * 32, "realm": "com.other", "capabilities": []}
    with pytest.raises(RealmMismatch):
        peer_from_ack(client, Frame(MessageType.CONNECT_ACK, lying_ack), "e")
