"""Hostile peers against provider records: only a provider changes its record; one peer holds a bounded share."""

from __future__ import annotations

import os

from macula_lab.core.messages import MessageType
from macula_lab.core.records import DEFAULT_MAX_PER_SOURCE
from macula_lab.runtime.dht import provider_key

from .test_fields import REALM, ask, session

SERVICE = "svc.victim"


def forged(node_id: bytes, *, seq: int = 1, endpoint: str = "quic://127.0.0.1:1") -> dict:
    return {"node_id": node_id, "endpoint": endpoint, "metadata": {}, "ttl": 300.0, "seq": seq}


async def mesh(nodes):
    a = await nodes("node-1", realm=REALM)
    b = await nodes("node-2", realm=REALM, bootstrap=[a.endpoint])
    await b.advertise(SERVICE, lambda args: "genuine")
    return a, b


async def test_nobody_but_the_provider_removes_its_record(nodes, certs):
    victim, provider = await mesh(nodes)
    key = provider_key(REALM, SERVICE)
    assert victim.dht.get_local(key)
    raw = await session(victim, certs, endpoint="quic://127.0.0.1:1", name="raw")
    try:
        reply = await ask(raw, MessageType.REMOVE, {"key": key, "provider": provider.node_id})
        assert reply.type is MessageType.ERROR and reply.body["code"] == "not_authorized"
    finally:
        raw.close()
    assert [e.node_id for e in victim.dht.get_local(key)] == [provider.node_id]
    assert await victim.call(SERVICE) == "genuine"


async def test_a_forged_entry_with_a_huge_seq_does_not_lock_the_provider_out(nodes, certs):
    """Once, a STORE in another node's name with seq 2**64-1 kept the real provider out for the record's life."""
    victim, provider = await mesh(nodes)
    key = provider_key(REALM, SERVICE)
    raw = await session(victim, certs, endpoint="quic://127.0.0.1:1", name="raw")
    try:
        dead = forged(provider.node_id, seq=2**64 - 1, endpoint="quic://127.0.0.1:9")
        reply = await ask(raw, MessageType.STORE, {"key": key, "value": dead})
        assert reply.type is MessageType.STORE_REPLY and reply.body["stored"] is False  # it holds the genuine one
    finally:
        raw.close()
    [entry] = victim.dht.get_local(key)
    assert entry.endpoint == provider.endpoint and entry.by_owner
    # and the provider re-advertising (a lower seq than the forgery) is accepted
    await provider.advertise(SERVICE, lambda args: "genuine again")
    assert await victim.call(SERVICE) in ("genuine", "genuine again")


async def test_forged_providers_under_a_key_are_bounded_and_keep_no_genuine_provider_out(nodes, certs):
    """Once, 99 forged providers per key made a genuine new provider refused everywhere."""
    victim = await nodes("node-1", realm=REALM)
    key = provider_key(REALM, SERVICE)
    raw = await session(victim, certs, endpoint="quic://127.0.0.1:1", name="raw")
    try:
        stored = 0
        for _ in range(99):
            reply = await ask(raw, MessageType.STORE, {"key": key, "value": forged(os.urandom(32))})
            stored += reply.body["stored"]
        assert stored == victim.dht.records.max_copies_per_key  # one peer's made-up providers are capped
    finally:
        raw.close()
    provider = await nodes("node-2", realm=REALM, bootstrap=[victim.endpoint])
    ad = await provider.advertise(SERVICE, lambda args: "genuine")
    assert ad.replicas >= 1
    assert provider.node_id in {e.node_id for e in victim.dht.get_local(key)}


async def test_one_peer_cannot_fill_a_nodes_store(nodes, certs):
    """Once, 10,000 STOREs from one peer filled a node's store and genuine services were refused."""
    victim = await nodes("node-1", realm=REALM)
    raw = await session(victim, certs, endpoint="quic://127.0.0.1:1", name="raw")
    try:
        refused = 0
        for i in range(DEFAULT_MAX_PER_SOURCE + 50):
            key = provider_key(REALM, f"flood.{i}")
            reply = await ask(raw, MessageType.STORE, {"key": key, "value": forged(os.urandom(32))})
            refused += reply.body["stored"] is False
        assert refused == 50 and victim.dht.records.stats()["refused_quota"] == 50
    finally:
        raw.close()
    provider = await nodes("node-2", realm=REALM, bootstrap=[victim.endpoint])
    assert (await provider.advertise(SERVICE, lambda args: "genuine")).replicas >= 1
    assert await victim.call(SERVICE) == "genuine"


async def test_an_attached_client_cannot_store_records(nodes, certs):
    victim = await nodes("node-1", realm=REALM)
    raw = await session(victim, certs)  # no endpoint: a client
    try:
        reply = await ask(raw, MessageType.STORE, {"key": provider_key(REALM, SERVICE), "value": forged(os.urandom(32))})
        assert reply.body["code"] == "not_authorized"
    finally:
        raw.close()
    assert len(victim.dht.records) == 0
