"""QUIC transport on real sockets: verified TLS, sessions, pooling, hostile peers."""

from __future__ import annotations

import asyncio
import logging
import socket

import msgpack
import pytest

from macula_lab.core.codec import HEADER, encode
from macula_lab.core.messages import MessageType, new_id
from macula_lab.errors import (
    CertificateError,
    ConnectFailed,
    ConnectTimeout,
    IdentityMismatch,
    MaculaError,
    NotStarted,
    PeerError,
    RealmMismatch,
    RequestTimeout,
    Unauthenticated,
)
from macula_lab.runtime.node import Node
from macula_lab.transport.quic import TlsConfig

from ..conftest import other_tasks, tls_for
from ..rawpeer import raw_connect
from ..timing import eventually


async def test_request_reply_between_two_nodes(nodes):
    a = await nodes("node-1")
    b = await nodes("node-2")
    assert await a.call_procedure(b.endpoint, "macula.echo", {"a": 10, "b": 5}) == {"a": 10, "b": 5}
    info = await b.call_procedure(a.endpoint, "macula.info")
    assert info["name"] == "node-1" and info["node_id"] == a.node_id.hex()
    assert await a.ping(b.endpoint) > 0


async def test_handler_sees_the_caller(nodes):
    a = await nodes("node-1")
    b = await nodes("node-2")
    seen = []

    async def who(args, peer):
        seen.append(peer)
        return peer.name

    b.procedure("test.who", who)
    assert await a.call_procedure(b.endpoint, "test.who") == "node-1"
    assert seen[0].node_id == a.node_id and seen[0].endpoint == a.endpoint and seen[0].realm == a.realm


async def test_many_requests_cost_one_handshake(nodes):
    a = await nodes("node-1")
    b = await nodes("node-2")
    results = await asyncio.gather(*(a.call_procedure(b.endpoint, "macula.echo", i) for i in range(200)))
    assert results == list(range(200))
    for _i in range(50):
        await a.ping(b.endpoint)
    stats = a.transport.stats()
    assert stats["handshakes"] == 1
    assert stats["pool"]["connects"] == 1
    assert b.transport.stats()["incoming_connections"] == 1


@pytest.mark.parametrize("mode", ["multiplex", "per-request"])
async def test_both_stream_modes_work(nodes, mode):
    a = await nodes("node-1", transport_options={"stream_mode": mode})
    b = await nodes("node-2")
    out = await asyncio.gather(*(a.call_procedure(b.endpoint, "macula.echo", {"i": i}) for i in range(100)))
    assert [o["i"] for o in out] == list(range(100))


async def test_peer_with_certificate_from_another_ca_is_refused(nodes, foreign_certs):
    a = await nodes("node-1")
    impostor = await nodes("node-2", tls=tls_for(foreign_certs, "node-2"))
    with pytest.raises(CertificateError):
        await a.ping(impostor.endpoint)
    # and the impostor cannot verify us either
    with pytest.raises(CertificateError):
        await impostor.ping(a.endpoint)


async def test_address_must_be_in_the_certificate(nodes):
    """A valid lab certificate for other addresses does not authenticate this one."""
    a = await nodes("node-1")
    # node-2's certificate names 127.0.0.1, ::1, localhost and node-2; not 127.0.0.2
    b = await nodes("node-2", listen="quic://127.0.0.2:0")
    with pytest.raises(CertificateError, match="127.0.0.2"):
        await a.ping(b.endpoint)


async def test_verified_incoming_session_is_reused_instead_of_dialling(nodes):
    """B answers A's session with requests of its own: A's certificate vouches for A's endpoint."""
    a = await nodes("node-1")
    b = await nodes("node-2")
    await a.ping(b.endpoint)  # A dials B
    info = await b.call_procedure(a.endpoint, "macula.info")  # B -> A over A's connection
    assert info["name"] == "node-1"
    assert b.transport.stats()["handshakes"] == 0 and b.transport.stats()["reused_incoming"] == 1
    assert a.transport.stats()["incoming_connections"] == 0
    assert b.transport.session(a.endpoint).node_id == a.node_id
    # A's connection goes away: B dials A itself next time
    await a.transport.pool.close_all()
    for _ in range(100):
        if not b.transport._verified_incoming:
            break
        await asyncio.sleep(0.01)
    assert b.transport._verified_incoming == {}
    assert await b.call_procedure(a.endpoint, "macula.echo", 1) == 1
    assert b.transport.stats()["handshakes"] == 1


async def test_sessions_need_a_certificate_and_may_claim_only_what_it_binds(nodes, certs):
    b = await nodes("node-2")
    # a node claiming an endpoint its certificate does not name (127.0.0.2 is not in it)
    liar = await nodes("node-1", advertise="quic://127.0.0.2:7")
    with pytest.raises(IdentityMismatch, match="does not name 127.0.0.2"):
        await liar.ping(b.endpoint)
    # an attached client without any certificate
    plain = Node(name="client", realm="com.test.lab", listen=None, tls=TlsConfig(ca=str(certs["client"].ca)))
    await plain.start()
    try:
        with pytest.raises(Unauthenticated):
            await plain.ping(b.endpoint)
    finally:
        await plain.stop()
    # with its client certificate it gets a session, but no endpoint to be dialled at
    client = Node(name="client", realm="com.test.lab", listen=None, tls=tls_for(certs, "client"))
    await client.start()
    try:
        assert await client.ping(b.endpoint) > 0
        assert client.node_id == certs["client"].node_id  # the id is the one its certificate binds
        assert b.transport.stats()["reused_incoming"] == 0 and b.transport._verified_incoming == {}
        assert b.transport.counters["refused_sessions"] == 2
    finally:
        await client.stop()


async def test_realm_mismatch_is_a_named_error(nodes):
    a = await nodes("node-1", realm="com.test.one")
    b = await nodes("node-2", realm="com.test.two")
    with pytest.raises(RealmMismatch) as err:
        await a.ping(b.endpoint)
    assert err.value.theirs == "com.test.two" and err.value.ours == "com.test.one"
    assert b.transport.stats()["refused_sessions"] == 1
    # the failed session is not kept: asking again fails the same way
    with pytest.raises(RealmMismatch):
        await a.ping(b.endpoint)


async def test_unknown_procedure_and_handler_errors(nodes):
    a = await nodes("node-1")
    b = await nodes("node-2")

    async def boom(args, peer):
        raise ZeroDivisionError("nope")

    b.procedure("test.boom", boom)
    with pytest.raises(PeerError) as err:
        await a.call_procedure(b.endpoint, "test.missing")
    assert err.value.remote_code == "no_such_procedure"
    with pytest.raises(PeerError) as err:
        await a.call_procedure(b.endpoint, "test.boom")
    assert err.value.remote_code == "handler_error" and "ZeroDivisionError" in str(err.value)
    assert await a.call_procedure(b.endpoint, "macula.echo", 1) == 1


async def test_request_timeout(nodes):
    a = await nodes("node-1")
    b = await nodes("node-2")

    async def slow(args, peer):
        await asyncio.sleep(60)

    b.procedure("test.slow", slow)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(RequestTimeout):
        await a.call_procedure(b.endpoint, "test.slow", timeout=0.3)
    assert 0.3 <= loop.time() - t0 < 30  # the 0.3 s timeout, not the 60 s handler (margin for load)
    assert await a.call_procedure(b.endpoint, "macula.echo", 2) == 2


async def test_request_timeouts_are_independent(nodes):
    """One expiry timer per connection: a short timeout sent after a long one still fires on time."""
    a = await nodes("node-1")
    b = await nodes("node-2")

    async def slow(args, peer):
        await asyncio.sleep(5)

    b.procedure("test.slow", slow)
    await a.ping(b.endpoint)  # connected: the timings below are the requests' own
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    done: dict[str, float] = {}

    async def call(label: str, timeout: float) -> None:
        with pytest.raises(RequestTimeout):
            await a.call_procedure(b.endpoint, "test.slow", timeout=timeout)
        done[label] = loop.time() - t0

    long = asyncio.ensure_future(call("long", 1.2))
    await asyncio.sleep(0.05)
    await asyncio.gather(call("short", 0.2), call("short too", 0.25))
    assert list(done) == ["short", "short too"] and done["short too"] < 0.9
    # meanwhile answered requests are not failed by the timer
    echoes = [a.call_procedure(b.endpoint, "macula.echo", i) for i in range(20)]
    assert await asyncio.gather(*echoes) == list(range(20))
    await long
    assert 1.1 < done["long"] < 2.5
    conn = a.transport.pool.peek(b.endpoint)
    assert not conn._pending


async def test_send_request_over_an_open_session(nodes):
    """The coroutine-free path: a future per request, a synchronous notify, nothing left behind."""
    a = await nodes("node-1")
    b = await nodes("node-2")

    async def slow(args, peer):
        await asyncio.sleep(5)

    b.procedure("test.slow", slow)
    assert a.send_request(b.endpoint, MessageType.PING, {}) is None  # no session yet: use request()
    await a.ping(b.endpoint)
    told: list[str] = []
    fut = a.send_request(
        b.endpoint,
        MessageType.CALL,
        {"procedure": "macula.echo", "args": 7},
        notify=lambda: told.append("echo"),
    )
    assert (await fut).body["result"] == 7 and told == ["echo"]
    # a timeout fails the future (and tells), an ERROR reply comes back as a frame
    fut = a.send_request(
        b.endpoint,
        MessageType.CALL,
        {"procedure": "test.slow", "args": None},
        timeout=0.2,
        notify=lambda: told.append("slow"),
    )
    with pytest.raises(RequestTimeout):
        await fut
    assert told == ["echo", "slow"]
    err = await a.send_request(b.endpoint, MessageType.CALL, {"procedure": "nope", "args": None})
    assert err.type is MessageType.ERROR and err.body["code"] == "no_such_procedure"
    # the end of the connection fails what is in flight
    conn = a.transport.pool.peek(b.endpoint)
    fut = a.send_request(b.endpoint, MessageType.CALL, {"procedure": "test.slow", "args": None}, timeout=5)
    assert len(conn._pending) == 1
    await b.stop()
    with pytest.raises(MaculaError):
        await asyncio.wait_for(fut, 3)
    assert not conn._pending


async def settled(read, quiet: float = 0.2, timeout: float = 10.0) -> int:
    """``read()`` once it kept its value for ``quiet`` s (longer than aioquic's 25 ms ACK delay).

    A loop stall cannot fake quiet: the ACK timer, due earlier, runs before our sleep ends.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    last = read()
    while loop.time() < end:
        await asyncio.sleep(quiet)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError(f"still sending after {timeout:g}s")


async def test_reply_on_an_idle_connection_carries_the_ack(nodes):
    """One request after a quiet spell costs two datagrams from the server's side, not three.

    aioquic would send the ACK of the request a millisecond after the reply, in a
    datagram of its own; the reply to a request on an idle connection carries it.
    """
    a = await nodes("node-1")
    b = await nodes("node-2")
    await a.ping(b.endpoint)
    (server,) = [p for p in b.transport._incoming if p.peer and p.peer.node_id == a.node_id]
    sent = await settled(lambda: server._quic._packet_number)  # everything acknowledged, idle
    await a.ping(b.endpoint)
    after = await settled(lambda: server._quic._packet_number)  # past aioquic's ACK delay
    assert after - sent == 1  # the reply, with the ACK in it


async def test_sync_quick_and_slow_handlers_alone_and_together(nodes):
    """Replies go out whether a handler answers at once, in its first step or later."""
    a = await nodes("node-1")
    b = await nodes("node-2")

    async def quick(args, peer):
        return args

    async def slow(args, peer):
        await asyncio.sleep(0.01)
        return args

    b.procedure("test.sync", lambda args, peer: args)
    b.procedure("test.quick", quick)
    b.procedure("test.slow", slow)
    names = ("test.sync", "test.quick", "test.slow")
    for name in names:  # one at a time: each reply is sent without waiting for company
        for i in range(20):
            assert await asyncio.wait_for(a.call_procedure(b.endpoint, name, i), 2) == i
    calls = [a.call_procedure(b.endpoint, names[i % 3], i) for i in range(300)]
    assert await asyncio.wait_for(asyncio.gather(*calls), 10) == list(range(300))
    # both ways at once: each node serves while its own requests are in flight
    both = [b.call_procedure(a.endpoint, "macula.echo", i) for i in range(50)]
    both += [a.call_procedure(b.endpoint, "test.quick", i) for i in range(50)]
    assert await asyncio.wait_for(asyncio.gather(*both), 10) == list(range(50)) * 2


async def test_connect_timeout_to_silent_port(nodes):
    a = await nodes("node-1", connect_timeout=0.5)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))  # a UDP port where nobody answers
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ConnectTimeout):
            await a.ping(f"quic://127.0.0.1:{sock.getsockname()[1]}")
        assert 0.5 <= loop.time() - t0 < 4  # its 0.5 s, not the default 5 s (margin for load)
    finally:
        sock.close()


async def test_unresolvable_host(nodes):
    a = await nodes("node-1", connect_timeout=2)
    with pytest.raises(ConnectFailed):
        await a.ping("quic://no-such-host.invalid:9443")


async def test_insecure_mode_is_explicit_and_loud(nodes, foreign_certs, caplog):
    b = await nodes("node-2", tls=tls_for(foreign_certs, "node-2"))
    with caplog.at_level(logging.WARNING):
        a = await nodes("node-1", tls=tls_for(foreign_certs, "node-1", verify=False))
    assert "CERTIFICATE VERIFICATION IS OFF" in caplog.text
    assert await a.ping(b.endpoint) > 0


async def test_listening_without_certificate_is_a_clear_error():
    node = Node(name="x")
    with pytest.raises(ConnectFailed, match="certificate"):
        await node.start()
    assert not node.running


async def test_start_and_stop_are_idempotent_and_leave_no_tasks(certs):
    before = other_tasks()
    a = Node(name="node-1", tls=tls_for(certs, "node-1"))
    b = Node(name="node-2", tls=tls_for(certs, "node-2"))
    await asyncio.gather(a.start(), a.start())
    await b.start()
    ep = a.endpoint
    await a.start()
    assert a.endpoint == ep
    await b.ping(a.endpoint)
    await asyncio.gather(*(b.call_procedure(a.endpoint, "macula.echo", i) for i in range(50)))
    await a.stop()
    await a.stop()
    await b.stop()
    await eventually(lambda: other_tasks() - before == set(), 5, "no task left")
    with pytest.raises(NotStarted):
        await a.ping(b.endpoint)


async def test_pool_is_bounded_lru(nodes):
    a = await nodes("node-1", transport_options={"pool_size": 2})
    peers = [await nodes(f"node-{i}") for i in (2, 3, 4)]
    for p in peers:
        await a.ping(p.endpoint)
    pool = a.transport.pool
    assert len(pool) == 2 and pool.counters["evictions"] == 1
    assert pool.peek(peers[0].endpoint) is None  # least recently used went first
    await a.ping(peers[0].endpoint)  # reconnects transparently
    assert pool.counters["connects"] == 4


async def test_pool_closes_idle_and_keeps_alive(nodes):
    a = await nodes("node-1", transport_options={"idle_timeout": 0.6, "keepalive_interval": 0.2})
    b = await nodes("node-2")
    await a.ping(b.endpoint)
    served = b.transport.stats()["requests_served"]
    await eventually(lambda: b.transport.stats()["requests_served"] > served, 10, "a keep-alive ping")
    await eventually(lambda: len(a.transport.pool) == 0, 10, "the idle connection closed")
    assert a.transport.pool.counters["idle_closed"] == 1


async def test_keepalive_drops_dead_peer(nodes):
    a = await nodes(
        "node-1", transport_options={"idle_timeout": 30, "keepalive_interval": 0.2}, request_timeout=0.3
    )
    b = await nodes("node-2")
    await a.ping(b.endpoint)
    # b vanishes without a goodbye: close its socket under it
    b.transport._server._transport.close()
    for proto in list(b.transport._incoming):
        proto._transport = None
    await eventually(lambda: a.transport.pool.counters["ping_failures"] >= 1, 10, "a failed keep-alive")
    await eventually(lambda: len(a.transport.pool) == 0, 10, "the dead peer dropped")


# --------------------------------------------------------- hostile raw peer
async def test_garbage_truncated_and_oversized_frames_get_errors_and_node_keeps_serving(nodes, certs):
    victim = await nodes("node-1", max_frame_size=4096)
    bystander = await nodes("node-2")
    raw = await raw_connect(victim.endpoint, certs)
    try:
        # before CONNECT: a request is refused with a named error
        [err] = await raw.exchange(encode(MessageType.PING, {"id": new_id()}))
        assert err.type is MessageType.ERROR and err.body["code"] == "not_connected"
        [ack] = await raw.exchange(raw.connect_frame(victim.realm))
        assert ack.type is MessageType.CONNECT_ACK

        cases = {
            "garbage": (b"\xde\xad\xbe\xef" * 8, "unknown_version"),
            "truncated": (encode(MessageType.PING, {"id": new_id()})[:-3], "truncated_frame"),
            "oversized": (HEADER.pack(1, MessageType.CALL, 0, 0, 10**8), "frame_too_large"),
            "bad msgpack": (HEADER.pack(1, MessageType.PING, 0, 0, 1) + b"\xc1", "malformed_payload"),
            "unknown type": (HEADER.pack(1, 0x7E, 0, 0, 1) + b"\x80", "unknown_type"),
            "missing field": (HEADER.pack(1, MessageType.CALL, 0, 0, 1) + b"\x80", "missing_field"),
        }
        for label, (data, code) in cases.items():
            items = await raw.exchange(data)
            assert items, f"no answer to {label}"
            assert items[0].type is MessageType.ERROR and items[0].body["code"] == code, label

        # a mistyped field: the error echoes the request id
        rid = new_id()
        bad = msgpack.packb({"id": rid, "target": "not-an-id"})
        [err] = await raw.exchange(HEADER.pack(1, MessageType.FIND_NODE, 0, 0, len(bad)) + bad)
        assert err.body["code"] == "invalid_field" and err.body["id"] == rid

        # the same connection still works, and so does everybody else
        [pong] = await raw.exchange(encode(MessageType.PING, {"id": rid}))
        assert pong.type is MessageType.PONG and pong.body["id"] == rid
        assert await bystander.call_procedure(victim.endpoint, "macula.echo", "still here") == "still here"
        assert victim.transport.stats()["bad_frames"] >= len(cases)
    finally:
        raw.close()


async def test_raw_peer_with_wrong_realm_gets_error_frame(nodes, certs):
    victim = await nodes("node-1")
    raw = await raw_connect(victim.endpoint, certs)
    try:
        [err] = await raw.exchange(raw.connect_frame("com.other.realm"))
        assert err.type is MessageType.ERROR and err.body["code"] == "realm_mismatch"
        [err] = await raw.exchange(encode(MessageType.PING, {"id": new_id()}))
        assert err.body["code"] == "realm_mismatch"
    finally:
        raw.close()


def test_insecure_flag_is_the_only_way_to_skip_verification(certs):
    from macula_lab.core.session import Identity
    from macula_lab.transport.quic import QuicTransport, TlsConfig

    me = Identity(certs["node-1"].node_id, "r")  # the id node-1's certificate binds
    t = QuicTransport(me, tls=TlsConfig(cert=str(certs["node-1"].cert), key=str(certs["node-1"].key)))
    with pytest.raises(ConnectFailed, match="CA"):
        t._config(is_client=True)
    with pytest.raises(IdentityMismatch):  # a certificate binds one id: no other may be claimed with it
        QuicTransport(Identity(b"\1" * 32, "r"), tls=tls_for(certs, "node-1"))
    t2 = QuicTransport(me, tls=tls_for(certs, "node-1"))
    assert t2.tls.verify and not TlsConfig(verify=False).verify  # only an explicit flag turns it off
    t2._config(is_client=True)  # (the server's certificate is checked by the transport itself)
