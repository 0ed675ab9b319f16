"""The transport contract (transport/base.py), one test body per clause, run on QUIC and on the simulated network."""

from __future__ import annotations

import asyncio
import os

import pytest

from macula_lab.core.messages import MessageType, new_id
from macula_lab.core.session import Identity
from macula_lab.errors import ConnectionClosed, RequestTimeout
from macula_lab.transport.memory import MemoryNetwork, MemoryTransport
from macula_lab.transport.quic import QuicTransport

from ..conftest import tls_for

REALM = "com.test.contract"


def identity(name: str, certs) -> Identity:
    """The identity ``certs[name]`` binds (on QUIC the certificate decides who a node is)."""
    return Identity(node_id=certs[name].node_id, realm=REALM, name=name)


def handler_for(name: str, seen: list):
    def handle(frame, peer):
        seen.append(peer)
        if frame.type is MessageType.CALL and frame.body["procedure"] == "slow":

            async def later():
                await asyncio.sleep(frame.body["args"])
                return MessageType.REPLY, {"result": "late"}

            return later()
        if frame.type is MessageType.CALL:
            return MessageType.REPLY, {"result": {"served_by": name, "args": frame.body["args"]}}
        return MessageType.PONG, {}

    return handle


@pytest.fixture(params=["quic", "memory"])
async def pair(request, certs):
    """(server, client, seen-by-server, seen-by-client): a listening node and a pure client, both started."""
    made = []
    if request.param == "quic":
        server = QuicTransport(identity("node-1", certs), tls=tls_for(certs, "node-1"))
        client = QuicTransport(identity("client", certs), listen=None, tls=tls_for(certs, "client"))
    else:
        net = MemoryNetwork()
        server = MemoryTransport(net, identity("node-1", certs))
        client = MemoryTransport(net, identity("client", certs), listen=False)
    seen_server, seen_client = [], []
    await server.start(handler_for("node-1", seen_server))
    await client.start(handler_for("client", seen_client))
    made += [client, server]
    yield server, client, seen_server, seen_client
    for t in made:
        await t.close()


def call(args=None, procedure="echo"):
    return {"procedure": procedure, "args": args}


async def test_request_reply_and_the_handler_sees_who_asked(pair):
    server, client, seen, _ = pair
    assert client.endpoint == ""  # a pure client: nobody can dial it
    assert client.session(server.endpoint) is None
    reply = await client.request(server.endpoint, MessageType.CALL, call(7))
    assert reply.body["result"] == {"served_by": "node-1", "args": 7}
    assert seen[-1].name == "client" and seen[-1].endpoint == ""
    peer = client.session(server.endpoint)
    assert peer is not None and peer.name == "node-1" and peer.node_id == server.identity.node_id


async def test_send_request_needs_an_open_session_and_notifies_synchronously(pair):
    server, client, _, _ = pair
    assert client.send_request(server.endpoint, MessageType.CALL, call(1)) is None  # no session yet
    await client.connect(server.endpoint)
    woken = []
    fut = client.send_request(server.endpoint, MessageType.CALL, call(2), notify=lambda: woken.append(fut.done()))
    assert fut is not None
    reply = await asyncio.wait_for(fut, 5)
    assert reply.body["result"]["args"] == 2
    assert woken == [True]  # called right after the future completed, not a loop pass later


async def test_every_request_has_a_timeout(pair):
    server, client, _, _ = pair
    await client.connect(server.endpoint)
    with pytest.raises(RequestTimeout):
        await client.request(server.endpoint, MessageType.CALL, call(1.0, "slow"), timeout=0.2)
    fut = client.send_request(server.endpoint, MessageType.CALL, {**call(1.0, "slow"), "id": new_id()}, timeout=0.2)
    with pytest.raises(RequestTimeout):
        await asyncio.wait_for(fut, 5)


async def test_requests_back_over_a_session_the_peer_opened(pair):
    server, client, _, seen_by_client = pair
    await client.connect(server.endpoint)
    reply = await server.request_session(client.identity.node_id, MessageType.CALL, call("back"))
    assert reply.body["result"] == {"served_by": "client", "args": "back"}
    assert seen_by_client[-1].name == "node-1"
    with pytest.raises(ConnectionClosed):
        await server.request_session(os.urandom(32), MessageType.CALL, call(0))


async def test_the_server_hears_when_a_peers_session_ends(pair):
    server, client, _, _ = pair
    closed = []
    server.on_session_closed = closed.append
    await client.connect(server.endpoint)
    await client.close()
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.05)
    assert [p.name for p in closed] == ["client"]
    with pytest.raises(ConnectionClosed):
        await server.request_session(client.identity.node_id, MessageType.CALL, call(0))
