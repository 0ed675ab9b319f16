"""The in-memory transport: sessions, link model, faults, cleanup and scale."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable

import pytest

from macula_lab.core.messages import Frame, MessageType
from macula_lab.core.session import Identity, PeerInfo
from macula_lab.errors import (
    ConnectFailed,
    ConnectionClosed,
    ConnectTimeout,
    FrameTooLarge,
    InvalidEndpoint,
    MaculaError,
    NotStarted,
    PeerError,
    RealmMismatch,
    RequestTimeout,
)
from macula_lab.transport.base import Reply
from macula_lab.transport.memory import EndpointInUse, MemoryNetwork, MemoryTransport

from ..timing import eventually

SHORT = 0.2  # timeouts for requests that are expected to go unanswered


class UnknownProcedure(MaculaError):
    code = "unknown_procedure"


async def echo(frame: Frame, peer: PeerInfo) -> Reply:
    """PING -> PONG; CALL "echo" -> its args; CALL "boom" -> a handler bug."""
    if frame.type is MessageType.PING:
        return MessageType.PONG, {}
    if frame.type is MessageType.CALL:
        proc = frame.body["procedure"]
        if proc == "echo":
            return MessageType.REPLY, {"result": frame.body["args"]}
        if proc == "whoami":
            return MessageType.REPLY, {
                "result": {
                    "node_id": peer.node_id,
                    "name": peer.name,
                    "endpoint": peer.endpoint,
                    "realm": peer.realm,
                }
            }
        if proc == "boom":
            raise ValueError("handler bug")
        if proc == "big":
            return MessageType.REPLY, {"result": b"x" * frame.body["args"]}
        if proc == "hang":
            await asyncio.Event().wait()
    raise UnknownProcedure(f"no procedure {frame.body.get('procedure')!r}")


def call(proc: str, args: object = None) -> tuple[MessageType, dict]:
    return MessageType.CALL, {"procedure": proc, "args": args}


def identity(name: str, realm: str = "lab") -> Identity:
    return Identity(node_id=os.urandom(32), realm=realm, name=name)


@pytest.fixture
def net() -> MemoryNetwork:
    return MemoryNetwork(seed=1)


@pytest.fixture
async def make(net: MemoryNetwork) -> AsyncIterator[Callable[..., object]]:
    """Factory of started transports on ``net``; closes them all afterwards."""
    made: list[MemoryTransport] = []

    async def _make(name: str, *, realm: str = "lab", handler=echo, **kw) -> MemoryTransport:
        t = MemoryTransport(net, identity(name, realm), **kw)
        made.append(t)
        await t.start(handler)
        return t

    yield _make
    for t in made:
        await t.close()


# ------------------------------------------------------------ basic exchange
async def test_request_reply_echo(make, net):
    a, b = await make("a"), await make("b")
    reply = await a.request(b.endpoint, *call("echo", {"x": [1, 2], "b": b"\x00"}))
    assert reply.type is MessageType.REPLY
    assert reply.body["result"] == {"x": [1, 2], "b": b"\x00"}
    pong = await a.request("mem://b", MessageType.PING, {})
    assert pong.type is MessageType.PONG
    assert net.stats()["sent"] == 6  # CONNECT, ACK, 2 x (request, reply)
    assert a.stats()["sessions"] == 1 and b.stats()["accepted"] == 1
    assert a.stats()["requests_sent"] == 2 and b.stats()["served"] == 2


async def test_handler_sees_peer_info_and_client_sees_server(make):
    a, b = await make("a"), await make("b")
    reply = await a.request(b.endpoint, *call("whoami"))
    assert reply.body["result"] == {
        "node_id": a.identity.node_id,
        "name": "a",
        "endpoint": "mem://a",
        "realm": "lab",
    }
    peer = a.session("mem://b")
    assert peer is not None
    assert (peer.node_id, peer.name, peer.endpoint, peer.realm) == (b.identity.node_id, "b", "mem://b", "lab")
    assert await a.connect("mem://b") == peer


async def test_pure_client_without_start(net, make):
    b = await make("b")
    client = MemoryTransport(net, identity("lab-client"))
    try:
        reply = await client.request(b.endpoint, *call("whoami"))
        assert reply.body["result"]["endpoint"] == ""  # not listening
        assert "lab-client" not in net
    finally:
        await client.close()


async def test_realm_mismatch(make):
    a, b = await make("a", realm="red"), await make("b", realm="blue")
    with pytest.raises(RealmMismatch) as info:
        await a.request(b.endpoint, MessageType.PING, {})
    assert (info.value.ours, info.value.theirs) == ("red", "blue")
    assert a.stats()["sessions"] == 0 and b.stats()["accepted"] == 0


async def test_concurrent_first_requests_share_one_handshake(make, net):
    a, b = await make("a"), await make("b")
    net.set_latency(a, b, 0.01)
    replies = await asyncio.gather(*(a.request(b.endpoint, *call("echo", i)) for i in range(10)))
    assert [r.body["result"] for r in replies] == list(range(10))
    assert a.stats()["handshakes"] == 1 and b.stats()["accepted"] == 1
    assert net.stats()["sent"] == 2 + 2 * 10


async def test_cancelled_waiter_does_not_cancel_the_shared_handshake(make, net):
    a, b = await make("a"), await make("b")
    net.set_latency(a, b, 0.5)  # a handshake of 1 s: no stall of the loop gets the cancel past it
    first = asyncio.ensure_future(a.request(b.endpoint, MessageType.PING, {}))
    second = asyncio.ensure_future(a.request(b.endpoint, MessageType.PING, {}))
    await eventually(lambda: net.stats()["in_flight"] == 1, 5, "the CONNECT under way")
    first.cancel()
    assert (await second).type is MessageType.PONG
    assert first.cancelled() and a.stats()["handshakes"] == 1


async def test_close_during_handshake(net):
    before = asyncio.all_tasks()
    a, b = MemoryTransport(net, identity("a")), MemoryTransport(net, identity("b"))
    await a.start(echo)
    await b.start(echo)
    net.set_latency(a, b, 0.5)  # a handshake of 1 s: the close comes well before it ends
    waiting = asyncio.ensure_future(a.request(b.endpoint, MessageType.PING, {}))
    await eventually(lambda: net.stats()["in_flight"] == 1, 5, "the CONNECT under way")
    await a.close()
    with pytest.raises(ConnectionClosed):
        await waiting
    await eventually(lambda: net.stats()["in_flight"] == 0, 5, "the CONNECT and its ACK landed")
    assert b.stats()["accepted"] == 0
    await b.close()
    assert asyncio.all_tasks() == before


# ----------------------------------------------------------------- link model
async def test_latency_is_honoured(make, net):
    a, b = await make("a"), await make("b")
    net.set_latency("a", "mem://b", 0.05)
    assert net.latency(b, a) == 0.05
    loop = asyncio.get_running_loop()
    eps = 1e-6  # the loop may run a timer up to its clock resolution early
    t0 = loop.time()
    await a.request(b.endpoint, MessageType.PING, {})
    assert loop.time() - t0 >= 0.2 - eps  # handshake round trip + request round trip
    t0 = loop.time()
    await a.request(b.endpoint, MessageType.PING, {})
    assert loop.time() - t0 >= 0.1 - eps


async def test_total_loss_times_out(make, net):
    a, b, c = await make("a"), await make("b"), await make("c", connect_timeout=SHORT)
    await a.request(b.endpoint, MessageType.PING, {})
    net.set_loss(a, b, 1.0)
    with pytest.raises(RequestTimeout):
        await a.request(b.endpoint, MessageType.PING, {}, timeout=SHORT)
    net.default_loss = 1.0
    with pytest.raises(ConnectTimeout):
        await c.request(b.endpoint, MessageType.PING, {})
    net.set_loss(a, b, None)
    net.default_loss = 0.0
    assert (await a.request(b.endpoint, MessageType.PING, {})).type is MessageType.PONG
    assert net.stats()["dropped_loss"] == 2


async def test_loss_is_deterministic_given_seed():
    """Deterministic by construction: no timeout decides an outcome, so no stall can change one.

    Requests go one at a time (the loss draws come in a fixed order); each ends
    when the network has decided it: its reply delivered, or one of its frames dropped.
    """

    async def run(seed: int) -> list[bool]:
        net = MemoryNetwork(seed=seed, default_latency=0.001)
        a = MemoryTransport(net, identity("a"))
        b = MemoryTransport(net, identity("b"))
        await a.start(echo)
        await b.start(echo)
        await a.request(b.endpoint, MessageType.PING, {})
        net.set_loss(a, b, 0.5)
        outcomes = []
        for _ in range(30):
            dropped = net.stats()["dropped_loss"]
            request = asyncio.ensure_future(a.request(b.endpoint, MessageType.PING, {}, timeout=60))
            await eventually(lambda: request.done() or net.stats()["dropped_loss"] > dropped, 10)  # noqa: B023
            outcomes.append(request.done() and request.exception() is None)
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
        assert net.stats()["dropped_loss"] == outcomes.count(False)
        await net.close()
        return outcomes

    first = await run(7)
    assert first == await run(7)
    assert any(first) and not all(first)


async def test_partition_then_heal(make, net):
    a, b, c = await make("a"), await make("b"), await make("c")
    for x, y in [(a, b), (a, c), (c, b)]:
        await x.request(y.endpoint, MessageType.PING, {})
    net.partition(["a", "b"], [c])
    assert net.can_reach(a, b) and not net.can_reach(a, c)
    await a.request(b.endpoint, MessageType.PING, {})
    with pytest.raises(RequestTimeout):
        await a.request(c.endpoint, MessageType.PING, {}, timeout=SHORT)
    with pytest.raises(RequestTimeout):
        await c.request(b.endpoint, MessageType.PING, {}, timeout=SHORT)
    net.heal()
    await a.request(c.endpoint, MessageType.PING, {})
    await c.request(b.endpoint, MessageType.PING, {})
    assert net.stats()["dropped_partition"] == 2


async def test_partition_unnamed_nodes_form_one_group(make, net):
    a, b, c = await make("a"), await make("b"), await make("c")
    net.partition("a")  # a alone; b and c (and later nodes) are "the rest"
    d = await make("d")
    await b.request(c.endpoint, MessageType.PING, {})
    await d.request(b.endpoint, MessageType.PING, {})
    assert not net.can_reach(a, b) and not net.can_reach(d, a)
    with pytest.raises(ValueError):
        net.partition(["a", "b"], ["b"])


async def test_in_flight_messages_are_lost_when_the_partition_starts(make, net):
    a, b = await make("a"), await make("b")
    await a.request(b.endpoint, MessageType.PING, {})
    net.set_latency(a, b, 0.05)
    pending = asyncio.ensure_future(a.request(b.endpoint, MessageType.PING, {}, timeout=SHORT))
    await asyncio.sleep(0.02)
    net.partition([a], [b])
    with pytest.raises(RequestTimeout):
        await pending


async def test_kill_times_out_while_others_keep_working(make, net):
    a, b, c = await make("a"), await make("b"), await make("c", connect_timeout=SHORT)
    await a.request(b.endpoint, MessageType.PING, {})
    await b.request(a.endpoint, MessageType.PING, {})
    net.kill("mem://b")
    assert not net.alive(b)
    with pytest.raises(RequestTimeout):
        await a.request(b.endpoint, MessageType.PING, {}, timeout=SHORT)
    with pytest.raises(ConnectTimeout):  # a killed host is silence, not a refusal
        await c.request(b.endpoint, MessageType.PING, {})
    with pytest.raises(RequestTimeout):  # the killed host cannot send either
        await b.request(a.endpoint, MessageType.PING, {}, timeout=SHORT)
    await a.request(c.endpoint, MessageType.PING, {})
    await c.request(a.endpoint, MessageType.PING, {})
    net.revive(b)
    await a.request(b.endpoint, MessageType.PING, {})
    await c.request(b.endpoint, MessageType.PING, {})


# ------------------------------------------------------------- errors, replies
async def test_error_reply_raises_peer_error(make):
    a, b = await make("a"), await make("b")
    with pytest.raises(PeerError) as info:
        await a.request(b.endpoint, *call("nope"))
    assert info.value.remote_code == "unknown_procedure"
    assert "nope" in info.value.remote_message
    assert b.stats()["served_errors"] == 1 and a.stats()["request_errors"] == 1


async def test_handler_exception_is_internal_error_and_node_keeps_serving(make, caplog):
    a, b = await make("a"), await make("b")
    with pytest.raises(PeerError) as info:
        await a.request(b.endpoint, *call("boom"))
    assert info.value.remote_code == "internal_error"
    assert "handler bug" in info.value.remote_message
    reply = await a.request(b.endpoint, *call("echo", 42))
    assert reply.body["result"] == 42


async def test_frame_limits_apply(make, net):
    net.max_frame_size = 1024
    a, b = await make("a"), await make("b")
    with pytest.raises(FrameTooLarge):  # our own frame: refused before it leaves
        await a.request(b.endpoint, *call("echo", b"x" * 2000))
    with pytest.raises(PeerError) as info:  # the peer's reply: it answers with the error
        await a.request(b.endpoint, *call("big", 2000))
    assert info.value.remote_code == "frame_too_large"
    assert (await a.request(b.endpoint, *call("big", 10))).body["result"] == b"x" * 10
    # a receiver with a smaller limit cannot frame the message: dropped, the sender times out
    small = await make("small", max_frame_size=300)
    await a.request(small.endpoint, MessageType.PING, {})
    with pytest.raises(RequestTimeout):
        await a.request(small.endpoint, *call("echo", b"x" * 500), timeout=SHORT)


# -------------------------------------------------------- names and endpoints
async def test_unknown_endpoint_fails_at_once(make):
    a = await make("a", connect_timeout=60)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(ConnectFailed):
        await a.request("mem://nobody", MessageType.PING, {})
    with pytest.raises(ConnectFailed):
        await a.request("quic://127.0.0.1:9443", MessageType.PING, {})
    with pytest.raises(InvalidEndpoint):
        await a.request("gopher://x", MessageType.PING, {})
    assert loop.time() - t0 < 10  # at once: none waited for the 60 s connect timeout


async def test_duplicate_name_is_refused_until_closed(net, make):
    a = await make("a")
    twin = MemoryTransport(net, identity("other"), name="a")
    with pytest.raises(EndpointInUse):
        await twin.start(echo)
    await a.close()
    assert await twin.start(echo) == "mem://a"
    await twin.close()
    with pytest.raises(InvalidEndpoint):
        MemoryTransport(net, identity(""))


async def test_start_and_close_are_idempotent(net):
    t = MemoryTransport(net, identity("a"))
    assert await t.start(echo) == "mem://a"
    assert await t.start(echo) == "mem://a"
    assert t.identity.endpoint == "mem://a" and len(net) == 1
    await t.close()
    await t.close()
    assert len(net) == 0
    with pytest.raises(NotStarted):
        await t.start(echo)
    with pytest.raises(NotStarted):
        await t.request("mem://a", MessageType.PING, {})


# ------------------------------------------------------------- close, restart
async def test_close_fails_pending_and_leaves_no_tasks(net):
    before = asyncio.all_tasks()
    a, b = MemoryTransport(net, identity("a")), MemoryTransport(net, identity("b"))
    await a.start(echo)
    await b.start(echo)
    hung = [asyncio.ensure_future(a.request(b.endpoint, *call("hang"))) for _ in range(5)]
    back = asyncio.ensure_future(b.request(a.endpoint, *call("hang")))
    await eventually(lambda: b.stats()["tasks"] == 5 and a.stats()["pending"] == 5, 5, "5 calls hanging")
    await a.close()
    for fut in hung:
        with pytest.raises(ConnectionClosed):
            await fut
    # a's close notice reached b: its request to a fails too, and a's name is gone
    with pytest.raises(ConnectionClosed):
        await back
    with pytest.raises(ConnectFailed):
        await b.request(a.endpoint, MessageType.PING, {})
    await b.close()
    assert b.stats()["tasks"] == 0
    assert asyncio.all_tasks() == before


async def test_restart_under_same_name_resets_stale_session(make, net):
    a, b = await make("a"), await make("b")
    await a.request(b.endpoint, MessageType.PING, {})
    net.partition([a], [b])  # b's close notice will not reach a
    await b.close()
    b2 = await make("b")
    net.heal()
    with pytest.raises(ConnectionClosed):  # the new b does not know a's session
        await a.request(b2.endpoint, MessageType.PING, {}, timeout=SHORT)
    reply = await a.request(b2.endpoint, *call("whoami"))  # new handshake
    assert reply.body["result"]["name"] == "a"
    assert a.session(b2.endpoint).node_id == b2.identity.node_id


# ----------------------------------------------------------------------- scale
async def test_two_thousand_nodes(net):
    rng = random.Random(3)
    nodes = [MemoryTransport(net, identity(f"n{i}")) for i in range(2000)]
    for t in nodes:
        await t.start(echo)
    try:
        # a random *other* node: draw among 1999 and skip over ourselves
        targets = [j + (j >= i) for i, j in enumerate(rng.randrange(1999) for _ in range(2000))]
        replies = await asyncio.gather(
            *(
                t.request(nodes[j].endpoint, *call("echo", i))
                for i, (t, j) in enumerate(zip(nodes, targets, strict=True))
            )
        )
        assert [r.body["result"] for r in replies] == list(range(2000))
        stats = net.stats()
        assert stats["sent"] == stats["delivered"] == 4 * 2000 and stats["dropped"] == 0
    finally:
        await net.close()
    assert len(net) == 0
