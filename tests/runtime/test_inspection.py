"""The inspection API: snapshot sections, and the admin token guarding INSPECT."""

from __future__ import annotations

import pytest

from macula_lab.lab.client import connect
from macula_lab.runtime.inspection import SECTIONS, Unauthorized, UnknownSection

from ..conftest import client_args

REALM = "com.test.inspect"


async def test_snapshot_sections(nodes):
    n1 = await nodes("node-1", realm=REALM)
    n2 = await nodes("node-2", realm=REALM, bootstrap=[n1.endpoint])
    await n1.advertise("svc.x", lambda a: a, ttl=10)
    await n2.call("svc.x", 1)
    snap = n2.inspector.snapshot()
    assert set(snap) == {"time", "name", *SECTIONS}
    assert snap["routing"][0]["name"] == "node-1"
    [provider] = snap["providers"]
    assert provider["provider"] == "node-1" and provider["selected"] == 1
    assert snap["metrics"]["gauges"]["cache_misses"] == 1 and snap["metrics"]["samples"]["rpc_rtt"]
    [ad] = n1.inspector.snapshot(["advertisements"])["advertisements"]
    assert ad["service"] == "svc.x" and ad["interval"] == pytest.approx(8.0) and 0 < ad["next_fire_in"] <= 8
    records = n1.inspector.snapshot(["records"])["records"] + snap["records"]
    assert records and all(r["metadata"]["service"] == "svc.x" and 0 < r["remaining"] <= 10 for r in records)
    later = n2.inspector.snapshot(["metrics", "events"], since=snap["time"])
    assert later["metrics"]["samples"]["rpc_rtt"] == [] and later["events"] == []
    with pytest.raises(UnknownSection, match="bogus"):
        n1.inspector.snapshot(["bogus"])


async def test_node_without_admin_token_refuses_inspection(nodes, certs):
    n1 = await nodes("node-1", realm=REALM)  # no admin token: inspection disabled
    async with await connect(n1.endpoint, realm=REALM, **client_args(certs)) as client:
        with pytest.raises(Unauthorized, match="no admin token"):
            await client.inspect("anything")


async def test_token_is_checked(nodes, certs):
    n1 = await nodes("node-1", realm=REALM, admin_token="t0ken")
    async with await connect(n1.endpoint, realm=REALM, **client_args(certs)) as client:
        with pytest.raises(Unauthorized, match="wrong admin token"):
            await client.inspect("t0ke")
        snap = await client.inspect("t0ken", ["node"])
        assert snap["node"]["name"] == "node-1" and set(snap) == {"time", "name", "node"}


async def test_a_gone_provider_keeps_its_name(nodes):
    """Selection counts of a provider that left the routing table and whose records expired read as its name."""
    n1 = await nodes("node-1", realm=REALM)
    n2 = await nodes("node-2", realm=REALM, bootstrap=[n1.endpoint])
    await n1.advertise("svc.gone", lambda a: a, ttl=10)
    await n2.call("svc.gone", 1)
    assert [p["provider"] for p in n2.inspector.snapshot(["providers"])["providers"]] == ["node-1"]
    # as after a kill: the contact evicted, the records gone
    n2.dht.table.remove(n1.node_id)
    for key, entry in n2.dht.records.entries():
        n2.dht.records.remove(key, entry.node_id)
    assert not n2.inspector.snapshot(["routing"])["routing"]
    [row] = n2.inspector.snapshot(["providers"])["providers"]
    assert row["provider"] == "node-1" and row["selected"] == 1
