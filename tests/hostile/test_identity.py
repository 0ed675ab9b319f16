"""Identities are proven, not claimed: a session needs a certificate of the lab CA and claims only what it binds."""

from __future__ import annotations

from macula_lab.core.messages import MessageType
from macula_lab.runtime.dht import provider_key

from ..rawpeer import raw_connect
from .test_fields import REALM, ask

SERVICE = "svc.victim"


async def refused(node, certs, *, cert="raw", **claims) -> dict:
    """CONNECT to ``node`` presenting ``certs[cert]`` with ``claims``: the node's answer."""
    raw = await raw_connect(node.endpoint, certs, cert=cert)
    try:
        [reply] = await raw.exchange(raw.connect_frame(REALM, **claims))
        assert reply.type is MessageType.ERROR, reply
        # and the connection stays without a session: every request is refused the same way
        after = await ask(raw, MessageType.PING, {})
        assert after.type is MessageType.ERROR and after.body["code"] == reply.body["code"]
        return reply.body
    finally:
        raw.close()


async def test_no_certificate_no_session(nodes, certs):
    """Once, a client with no certificate could CONNECT as any node id and endpoint."""
    victim = await nodes("node-1", realm=REALM)
    body = await refused(victim, certs, cert=None, endpoint="quic://127.0.0.1:1")
    assert body["code"] == "unauthenticated"
    assert len(victim.dht.table) == 0


async def test_a_certificate_of_another_ca_gets_no_session(nodes, certs, foreign_certs):
    victim = await nodes("node-1", realm=REALM)
    # trusting our CA (certs["raw"].ca) but presenting a certificate of another CA
    mixed = {"raw": certs["raw"], "alien": foreign_certs["node-1"]}
    body = await refused(victim, mixed, cert="alien")
    assert body["code"] == "unauthenticated"


async def test_nobody_can_claim_another_nodes_id(nodes, certs):
    """Once, a peer could point a node's routing entry for another node at a dead address,
    and REMOVE that node's records."""
    victim = await nodes("node-1", realm=REALM)
    other = await nodes("node-2", realm=REALM, bootstrap=[victim.endpoint])
    await other.advertise(SERVICE, lambda a: "genuine")
    body = await refused(victim, certs, node_id=other.node_id, endpoint="quic://127.0.0.1:9", name="node-2")
    assert body["code"] == "identity_mismatch"
    [contact] = victim.dht.table.contacts()
    assert contact.node_id == other.node_id and contact.endpoint == other.endpoint  # untouched
    assert [e.node_id for e in victim.dht.get_local(provider_key(REALM, SERVICE))] == [other.node_id]


async def test_an_endpoint_is_claimed_only_where_the_certificate_names_its_host(nodes, certs):
    victim = await nodes("node-1", realm=REALM)
    body = await refused(victim, certs, endpoint="quic://10.9.9.9:9443")  # raw's certificate names 127.0.0.1
    assert body["code"] == "identity_mismatch" and "10.9.9.9" in body["message"]
    # a client certificate names no host: its holder can never pose as a node listening somewhere
    body = await refused(victim, certs, cert="client", endpoint="quic://127.0.0.1:9443")
    assert body["code"] == "identity_mismatch"
    assert len(victim.dht.table) == 0
