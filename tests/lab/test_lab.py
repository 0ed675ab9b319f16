"""The lab engine: local meshes (QUIC and simulated), attached meshes of node processes."""

from __future__ import annotations

import asyncio

import pytest

from macula_lab import Lab
from macula_lab.lab import LabError, NeedsMemoryNetwork, NoSuchNode
from macula_lab.lab.nodes import NodeNotRunning
from macula_lab.runtime.inspection import Unauthorized
from macula_lab.runtime.services import AllProvidersFailed, ServiceNotFound

from ..conftest import client_args, other_tasks
from ..timing import eventually

REALM = "com.test.lab"


async def test_start_advertise_call_and_stop_leaves_nothing_running():
    before = other_tasks()
    lab = await Lab.start(3, realm=REALM, sample_interval=0.1)
    try:
        assert lab.names == ["node-1", "node-2", "node-3"]
        assert all(n.running and n.endpoint.startswith("quic://127.0.0.1:") for n in lab.nodes)
        assert await lab.node("node-1").advertise("test.calculator", "calculator", ttl=30) >= 1
        res = await lab.node("node-2").call("test.calculator", {"operation": "add", "a": 10, "b": 5})
        assert res.value == {"result": 15, "node": "node-1"} and res.provider == "node-1"
        await lab.sample()
        snap = lab.snapshots["node-1"]
        [ad] = snap["advertisements"]
        assert ad["service"] == "test.calculator" and ad["interval"] == pytest.approx(24.0)
        assert {e["kind"] for e in lab.events} >= {
            "published",
            "readvertise_scheduled",
            "discovered",
            "called",
        }
    finally:
        await lab.stop()
    assert lab.stopped and not any(n.running for n in lab.nodes)
    assert other_tasks() <= before, other_tasks() - before
    await lab.stop()  # idempotent


async def test_add_stop_and_kill_nodes():
    lab = await Lab.start(2, realm=REALM, sample_interval=None)
    try:
        n3 = await lab.add_node()
        assert n3.name == "node-3" and n3.running
        named = await lab.add_node("edge")
        assert named.name == "edge"
        with pytest.raises(LabError, match="already"):
            await lab.add_node("edge")
        # the newcomer joined through the others: it finds what node-1 serves
        await lab.node("node-1").advertise("svc.a", "whoami", ttl=30)
        assert (await lab.node("edge").call("svc.a")).value == {"node": "node-1"}
        await lab.stop_node("node-3")
        await lab.kill_node("edge")
        assert [n.name for n in lab.running_nodes()] == ["node-1", "node-2"]
        with pytest.raises(NodeNotRunning):
            await lab.node("edge").call("svc.a")
        with pytest.raises(NoSuchNode, match="nodes: "):
            lab.node("node-9")
        with pytest.raises(NeedsMemoryNetwork):
            lab.partition(["node-1"], ["node-2"])
    finally:
        await lab.stop()


async def test_killed_provider_fails_over_to_the_other():
    lab = await Lab.start(3, realm=REALM, sample_interval=None, request_timeout=1.0)
    try:
        for name in ("node-1", "node-3"):
            await lab.node(name).advertise("svc.pair", "whoami", ttl=30)
        consumer = lab.node("node-2")
        assert len(await consumer.discover("svc.pair")) == 2
        await lab.kill_node("node-1")
        served = {
            (await consumer.call("svc.pair", timeout=1.0, strategy="round_robin")).provider for _ in range(4)
        }
        assert served == {"node-3"}
    finally:
        await lab.stop()


async def test_memory_lab_partition_and_heal():
    lab = await Lab.start(4, realm=REALM, transport="memory", sample_interval=None, request_timeout=0.3)
    try:
        assert lab.node("node-1").endpoint == "mem://node-1"
        await lab.node("node-1").advertise("svc.p", "whoami", ttl=30)
        lab.set_latency(0.002)
        res = await lab.node("node-4").call("svc.p")
        assert res.value == {"node": "node-1"} and res.latency >= 0.004  # one round trip at least
        lab.partition(["node-1", "node-2"], ["node-3", "node-4"])
        with pytest.raises(AllProvidersFailed):
            await lab.node("node-4").call("svc.p", timeout=0.3, max_attempts=1)
        lab.heal()
        assert (await lab.node("node-4").call("svc.p", timeout=2.0)).value == {"node": "node-1"}
        with pytest.raises(NoSuchNode):
            lab.partition(["node-1"], ["nope"])
    finally:
        await lab.stop()


async def test_unknown_service_is_named():
    lab = await Lab.start(2, realm=REALM, sample_interval=None)
    try:
        with pytest.raises(ServiceNotFound):
            await lab.node("node-2").call("nobody.serves.this")
    finally:
        await lab.stop()


async def test_sampler_builds_the_metrics_table_and_reprs():
    lab = await Lab.start(3, realm=REALM, sample_interval=0.05)
    try:
        await lab.node("node-1").advertise("svc.m", "echo", ttl=30)
        for _ in range(5):
            await lab.node("node-3").call("svc.m", {"x": 1})

        # what node-3 itself counts (a call retried on a loaded machine selects node-1 once more)
        services = lab.node("node-3").node.services
        [stat] = services.stats.snapshot()
        ratio = services.cache.stats()["hit_ratio"]
        assert stat["selected"] >= 5 and services.ok_calls == 5

        def sampled():  # a sample taken after the 5 calls
            t = lab.metrics()
            sel = t[(t.metric == "selected") & (t.node == "node-3")] if len(t) else t
            return len(sel) and sel["value"].iloc[-1] == stat["selected"]

        await eventually(sampled, 10, "a sample after the calls")
        table = lab.metrics()
        metrics = set(table["metric"])
        assert {"dht_query_ms", "rpc_rtt_ms", "cache_hit_ratio", "selected", "routing_table_size"} <= metrics
        selected = table[(table.metric == "selected") & (table.node == "node-3")]
        assert selected["label"].iloc[-1] == "node-1"
        summary = lab.metrics_summary()
        assert summary["rpc_rtt_ms"]["count"] == 5  # one round trip sampled per successful call
        assert summary["cache_hit_ratio"]["last"] == pytest.approx(ratio) and ratio >= 0.6
        assert "node-1" in repr(lab) and "<table>" in lab._repr_html_()
        assert "services" in lab.node("node-1").node._repr_html_()
        assert not lab.errors
    finally:
        await lab.stop()


async def test_sampling_errors_are_surfaced_not_lost():
    lab = await Lab.start(2, realm=REALM, sample_interval=None)
    try:
        lab.on_sample(lambda _lab: 1 / 0)
        await lab.sample()
        assert lab.errors[-1]["where"] == "view update" and "ZeroDivisionError" in lab.errors[-1]["error"]
        assert "background error" in lab._repr_html_()
    finally:
        await lab.stop()


@pytest.fixture
async def mesh_procs(node_processes):
    return await node_processes(REALM, "s3cret")


async def test_attach_to_node_processes(mesh_procs, certs):
    urls = [p.endpoint for p in mesh_procs]
    lab = await Lab.attach(urls, realm=REALM, **client_args(certs), token="s3cret", sample_interval=0.1)
    try:
        assert lab.names == ["node-1", "node-2", "node-3"] and lab.mode == "attached"
        # handlers run here; the nodes publish and relay
        await lab.node("node-1").advertise("test.calculator", "calculator", ttl=30)
        await lab.node("node-3").advertise("test.calculator", "calculator", ttl=30)
        res = await lab.node("node-2").call("test.calculator", {"a": 10, "b": 5}, strategy="round_robin")
        assert res.value["result"] == 15 and res.value["node"] in ("node-1", "node-3")
        assert len(await lab.node("node-2").discover("test.calculator")) == 2
        await lab.sample()
        snap = lab.snapshots["node-1"]
        assert [a["service"] for a in snap["advertisements"]] == ["test.calculator"]
        assert snap["routing"] and all(r["remaining"] > 25 for r in snap["records"])
        assert "rpc_rtt_ms" in set(lab.metrics()["metric"])
        with pytest.raises(LabError, match="orchestrator"):
            await lab.kill_node("node-1")
    finally:
        await lab.stop()
    # detaching withdrew what the lab advertised through the nodes
    lab2 = await Lab.attach(urls[1], realm=REALM, **client_args(certs), token="s3cret", sample_interval=None)
    try:
        with pytest.raises(ServiceNotFound):
            await lab2.node("node-2").call("test.calculator", {"a": 1, "b": 2})
    finally:
        await lab2.stop()


@pytest.mark.parametrize("token", [None, "", "wrong"])
async def test_inspection_refuses_missing_or_wrong_token(mesh_procs, certs, token):
    lab = await Lab.attach(
        mesh_procs[0].endpoint, realm=REALM, **client_args(certs), token=token, sample_interval=None
    )
    try:
        with pytest.raises(Unauthorized, match="admin token"):
            await lab.node("node-1").inspect()
        # calls still work without the token: only inspection is guarded
        await lab.node("node-1").advertise("svc.open", "whoami", ttl=30)
        assert (await lab.node("node-1").call("svc.open")).value == {"node": "node-1"}
        await lab.sample()
        assert "Unauthorized" in lab.errors[-1]["error"]
    finally:
        await lab.stop()


async def test_attach_failure_is_named_and_cleans_up(certs):
    before = other_tasks()
    with pytest.raises(LabError, match="could not attach to quic://127.0.0.1:9"):
        await Lab.attach(["quic://127.0.0.1:9"], realm=REALM, **client_args(certs), timeout=0.3)
    await asyncio.sleep(0)
    assert other_tasks() <= before


def test_sync_twins_for_scripts():
    lab = Lab.start_sync(2, realm=REALM, sample_interval=None)
    try:
        lab.advertise_sync("node-1", "svc.sync", "calculator", ttl=30)
        res = lab.call_sync("node-2", "svc.sync", {"a": 2, "b": 3})
        assert res.value == {"result": 5, "node": "node-1"}
        assert lab.inspect_sync("node-1", ["advertisements"])["advertisements"][0]["service"] == "svc.sync"
    finally:
        lab.stop_sync()
    assert lab.stopped


async def test_new_nodes_bootstrap_from_joined_running_nodes_only():
    lab = await Lab.start(6, realm=REALM, transport="memory", sample_interval=None, seed=5)
    try:
        await lab.stop_node("node-2")
        await lab.kill_node("node-4")
        for _ in range(6):
            handle = await lab.add_node()
            assert handle.node.bootstrap, "a new node gets bootstrap peers"
            assert not {"mem://node-2", "mem://node-4"} & set(handle.node.bootstrap)
            assert handle.node.ready
    finally:
        await lab.stop()
