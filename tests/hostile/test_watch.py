"""Hostile subscribers: WATCH is checked at the edge and a peer can make a node hold only so many."""

from __future__ import annotations

import os

from macula_lab.core.ids import service_key
from macula_lab.core.messages import MessageType
from macula_lab.core.watch import DEFAULT_MAX_WATCHES_PER_PEER

from ..rawpeer import raw_connect
from .test_fields import REALM, ask, session

#: where the raw peer claims to listen (its certificate names 127.0.0.1; nothing answers there)
NOWHERE = "quic://127.0.0.1:9"


async def test_a_peer_holds_a_bounded_number_of_watches(nodes, certs):
    victim = await nodes("node-1", realm=REALM)
    raw = await session(victim, certs, endpoint=NOWHERE)
    try:
        codes = []
        for _ in range(DEFAULT_MAX_WATCHES_PER_PEER + 8):
            reply = await ask(raw, MessageType.WATCH, {"key": os.urandom(32), "lease": 120.0})
            codes.append(reply.body.get("code", "ok"))
        assert codes.count("ok") == DEFAULT_MAX_WATCHES_PER_PEER
        assert codes[DEFAULT_MAX_WATCHES_PER_PEER:] == ["quota_exceeded"] * 8
        assert len(victim.watches.subscribers) == DEFAULT_MAX_WATCHES_PER_PEER
        # and the node in total, whoever asks
        victim.watches.subscribers.max_total = DEFAULT_MAX_WATCHES_PER_PEER + 2
        other = await session(victim, certs, endpoint=NOWHERE)  # the same certificate again: same peer
        reply = await ask(other, MessageType.WATCH, {"key": os.urandom(32), "lease": 1.0})
        assert reply.body["code"] == "quota_exceeded"
        other.close()
        helper = await nodes("node-2", realm=REALM)
        for _ in range(2):
            await helper.request(victim.endpoint, MessageType.WATCH, {"key": os.urandom(32), "lease": 1.0})
        reply = await ask(raw, MessageType.WATCH, {"key": os.urandom(32), "lease": 1.0})
        assert reply.body["code"] == "quota_exceeded"
        assert len(victim.watches.subscribers) == DEFAULT_MAX_WATCHES_PER_PEER + 2
    finally:
        raw.close()


async def test_bad_watches_are_refused_by_name_and_clients_may_not_subscribe(nodes, certs):
    victim = await nodes("node-1", realm=REALM)
    raw = await session(victim, certs, endpoint=NOWHERE)
    try:
        for bad in ({"key": b"short", "lease": 1.0}, {"key": os.urandom(32), "lease": 0}, {"key": os.urandom(32)}):
            reply = await ask(raw, MessageType.WATCH, bad)
            assert reply.type is MessageType.ERROR and reply.body["code"] in ("invalid_field", "missing_field")
    finally:
        raw.close()
    client = await raw_connect(victim.endpoint, certs, cert="client")
    try:
        [ack] = await client.exchange(client.connect_frame(REALM))
        assert ack.type is MessageType.CONNECT_ACK
        reply = await ask(client, MessageType.WATCH, {"key": os.urandom(32), "lease": 1.0})
        assert reply.body["code"] == "not_authorized"
    finally:
        client.close()
    assert len(victim.watches.subscribers) == 0


async def test_pushes_from_a_peer_the_watcher_did_not_subscribe_at_change_nothing(nodes, certs):
    watcher = await nodes("node-1", realm=REALM)
    watch = watcher.watch("svc.target")
    assert (await watch.next(timeout=10)).kind == "reset"
    raw = await session(watcher, certs, endpoint=NOWHERE)
    try:
        fake = {"node_id": os.urandom(32), "endpoint": NOWHERE, "metadata": {}, "ttl": 60.0, "seq": 1}
        reply = await ask(
            raw,
            MessageType.WATCH_EVENT,
            {"key": service_key(REALM, "svc.target"), "kind": "stored", "value": fake},
        )
        assert reply.body["ok"] is False
        reply = await ask(
            raw, MessageType.WATCH_EVENT, {"key": os.urandom(32), "kind": "exploded", "value": fake}
        )
        assert reply.body["code"] == "invalid_field"
    finally:
        raw.close()
    assert watch.take() is None and watcher.watches.counters["pushes_ignored"] == 1
    watch.close()
