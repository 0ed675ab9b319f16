"""Hostile attached clients: they cannot take over a node's service or another client's, and are bounded."""

from __future__ import annotations

import asyncio

import pytest

import macula_lab
from macula_lab.core.messages import MessageType
from macula_lab.errors import QuotaExceeded
from macula_lab.runtime.gateway import MAX_ADS_PER_CLIENT, ServiceOwnedElsewhere

from ..conftest import client_args
from .test_fields import REALM, ask, session


async def connect(node, certs):
    return await macula_lab.connect(node.endpoint, realm=REALM, **client_args(certs))


async def test_a_client_cannot_take_over_the_nodes_own_service(nodes, certs):
    """Once, a client advertising the node's service name replaced its handler ({"pwned": true})
    and, on leaving, withdrew the node's own service."""
    node = await nodes("node-1", realm=REALM)
    caller = await nodes("node-2", realm=REALM, bootstrap=[node.endpoint])
    await node.advertise("svc.own", lambda a: "the node's")
    client = await connect(node, certs)
    try:
        with pytest.raises(ServiceOwnedElsewhere):
            await client.advertise("svc.own", lambda a: {"pwned": True})
        assert await caller.call("svc.own") == "the node's"
    finally:
        await client.close()
    await asyncio.sleep(0.2)  # the node hears the session end
    assert "svc.own" in node.services.ads and node.services.live_timers() == ["svc.own"]
    assert await caller.call("svc.own") == "the node's"


async def test_a_refused_advertise_leaves_the_owners_timer_running(nodes, certs):
    """Once, an ADVERTISE refused for ttl=0 still cancelled the owner's re-advertisement timer."""
    node = await nodes("node-1", realm=REALM)
    await node.advertise("svc.own", lambda a: "ok", ttl=60)
    raw = await session(node, certs)
    try:
        reply = await ask(raw, MessageType.ADVERTISE, {"service": "svc.own", "ttl": 0, "metadata": {}})
        assert reply.body["code"] == "invalid_field"
    finally:
        raw.close()
    assert node.services.live_timers() == ["svc.own"] and node.services.ads["svc.own"].ttl == 60


async def test_a_client_advertises_a_bounded_number_of_services(nodes, certs):
    """Once, 200 ADVERTISEs from one client were all accepted."""
    node = await nodes("node-1", realm=REALM)
    client = await connect(node, certs)
    try:
        for i in range(MAX_ADS_PER_CLIENT):
            await client.advertise(f"svc.c{i}", lambda a: a, ttl=60)
        with pytest.raises(QuotaExceeded):
            await client.advertise("svc.one-too-many", lambda a: a, ttl=60)
        assert len(node.services.ads) == MAX_ADS_PER_CLIENT
        assert "svc.one-too-many" not in client.advertised
    finally:
        await client.close()
