"""Hostile peers, raw frames and fields: every bad value gets a named error and changes nothing.

A raw QUIC peer (tests/hostile.py) sends frames our own encoder would refuse.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from macula_lab import CallTimeout
from macula_lab.core.messages import MessageType, new_id

from ..rawpeer import raw_connect, raw_frame

REALM = "com.test.hostile"


async def session(node, certs, **claims):
    raw = await raw_connect(node.endpoint, certs)
    [ack] = await raw.exchange(raw.connect_frame(REALM, **claims))
    assert ack.type is MessageType.CONNECT_ACK, ack
    return raw


async def ask(raw, mtype, body) -> dict:
    rid = new_id()
    [reply] = await raw.exchange(raw_frame(mtype, {"id": rid, **body}))
    assert reply.body["id"] == rid
    return reply


async def test_a_nan_or_infinite_timeout_is_refused_and_request_deadlines_keep_firing(nodes, certs):
    """Once, a SERVICE_CALL with timeout=NaN reached the deadline queue and no deadline fired again."""
    victim = await nodes("node-1", realm=REALM)
    slow = await nodes("node-2", realm=REALM, bootstrap=[victim.endpoint])

    async def a_minute(args):  # far from the 0.4 s deadline, however loaded the machine
        await asyncio.sleep(60.0)
        return "late"

    await slow.advertise("svc.slow", a_minute)
    raw = await session(victim, certs)
    try:
        for timeout in (math.nan, math.inf, -math.inf):
            reply = await ask(raw, MessageType.SERVICE_CALL, {"service": "svc.slow", "args": {}, "timeout": timeout})
            assert reply.type is MessageType.ERROR and reply.body["code"] == "invalid_field"
            assert reply.body["details"] == {"field": "timeout"}
    finally:
        raw.close()
    # the victim's deadlines still fire: a 0.4 s call to a 60 s handler ends after ~0.4 s
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(CallTimeout):
        await victim.call("svc.slow", {}, timeout=0.4, max_attempts=1)
    assert loop.time() - t0 < 30


async def test_edge_values_get_invalid_field_never_internal_error(nodes, certs):
    victim = await nodes("node-1", realm=REALM)
    raw = await session(victim, certs)
    try:
        for ttl in (0, -5, math.nan, math.inf):
            reply = await ask(raw, MessageType.ADVERTISE, {"service": "svc.x", "ttl": ttl, "metadata": {}})
            assert (reply.body["code"], reply.body["details"]) == ("invalid_field", {"field": "ttl"}), ttl
        for attempts in (0, -7):
            body = {"service": "svc.x", "args": {}, "timeout": 1.0, "max_attempts": attempts}
            reply = await ask(raw, MessageType.SERVICE_CALL, body)
            assert (reply.body["code"], reply.body["details"]) == ("invalid_field", {"field": "max_attempts"})
    finally:
        raw.close()
    assert victim.services.ads == {}


async def test_a_malformed_endpoint_is_refused_at_connect_and_never_reaches_the_routing_table(nodes, certs):
    """A 64-character DNS label once entered routing tables, and every dial of it raised UnicodeError."""
    victim = await nodes("node-1", realm=REALM)
    other = await nodes("node-2", realm=REALM, bootstrap=[victim.endpoint])
    await other.advertise("svc.ok", lambda a: "ok")
    bad_endpoints = ["quic://" + "a" * 64 + ".lab:9443", "quic://" + "x" * 600_000 + ":1", "quic://bad host:1"]
    for endpoint in bad_endpoints:
        raw = await raw_connect(victim.endpoint, certs)
        try:
            [err] = await raw.exchange(raw.connect_frame(REALM, endpoint=endpoint), wait=5.0)
            assert err.type is MessageType.ERROR and err.body["code"] in ("invalid_field", "frame_too_large")
        finally:
            raw.close()
    assert {c.endpoint for c in victim.dht.table.contacts()} == {other.endpoint}
    assert await victim.call("svc.ok") == "ok"  # lookups unharmed
    assert await victim.discover("svc.ok", refresh=True)
