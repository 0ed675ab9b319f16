"""Simulations: the node code on virtual time, its operations table, faults, and determinism."""

from __future__ import annotations

import asyncio

import pytest

from macula_lab import Simulation
from macula_lab.lab.nodes import LocalNode

pytestmark = pytest.mark.slow

OPTS = {"latency": 0.02, "jitter": 0.005, "loss": 0.01, "progress": False}


async def scenario(seed: int, n: int = 24) -> Simulation:
    sim = await Simulation.start(n, seed=seed, **OPTS)
    await sim.advertise_many([(name, f"svc.{name}") for name in sim.names[:8]], ttl=60)
    await sim.discover_many(list(zip(sim.random_nodes(12), [f"svc.node-{i}" for i in range(1, 13)], strict=True)))
    await sim.kill("node-3")
    await sim.run_for(120)  # past the TTL: re-advertisements and expiry on virtual time
    return sim


async def test_same_seed_same_trace_other_seed_another():
    a = await scenario(1)
    b = await scenario(1)
    c = await scenario(2)
    try:
        assert a.trace_hash() == b.trace_hash()
        assert a.operations().equals(b.operations())
        assert c.trace_hash() != a.trace_hash()
        # the replay from seed and parameters is the same run again
        r = await Simulation.replay(a.seed, a.params(), progress=False)
        try:
            assert r.trace_hash() == a.trace_hash()
        finally:
            await r.stop()
    finally:
        await asyncio.gather(a.stop(), b.stop(), c.stop())


async def test_an_hour_passes_in_simulated_time_and_ttls_expire():
    sim = await Simulation.start(16, seed=3, **OPTS)
    try:
        loop = asyncio.get_running_loop()
        wall0 = loop.time()
        await sim.node("node-2").advertise("test.echo", "echo", ttl=60)
        found = await sim.node("node-9").discover("test.echo", refresh=True)
        assert [e.endpoint for e in found] == ["mem://node-2"]
        await sim.kill("node-2")
        t0 = sim.now
        await sim.run_for(3600)
        assert sim.now == pytest.approx(t0 + 3600)
        assert loop.time() - wall0 < 60  # an hour of timers in well under a minute
        gone = await sim.node("node-9").discover("test.echo", refresh=True)
        assert gone == []  # the dead provider's record expired with its TTL
        ops = sim.operations()
        assert list(ops.columns[:8]) == ["time", "node", "op", "service", "latency", "hops", "messages", "outcome"]
        assert ops["outcome"].tolist() == ["ok", "ok", "not_found"]
        assert ops["messages"].iloc[0] > 0 and ops["latency"].iloc[0] > 0
        # node code stamped its events with simulated time, not the host's clock
        handle = sim.lab.node("node-9")
        assert isinstance(handle, LocalNode)
        assert handle.node.services.events[-1].at == pytest.approx(sim.loop.wall_time(), abs=5)
    finally:
        await sim.stop()


async def test_partition_cuts_discovery_and_heal_restores_it():
    sim = await Simulation.start(12, seed=4, latency=0.01, progress=False, cache_ttl=1)
    try:
        await sim.node("node-1").advertise("test.p", "echo", ttl=300)
        sim.partition(["node-1"])
        with pytest.raises(Exception):  # noqa: B017 - whichever way the call fails, it must fail
            await sim.node("node-5").call("test.p", {"x": 1})
        sim.heal()
        await sim.run_for(5)
        value = await sim.node("node-5").call("test.p", {"x": 1})
        assert value.provider == "node-1"
        added = await sim.add(2)
        assert added == ["node-13", "node-14"] and set(added) <= set(sim.running())
    finally:
        await sim.stop()


async def test_tuned_nodes_republish_at_their_fraction_and_calls_see_the_cache():
    """readvertise_fraction reaches every node; call_many and discover_many(refresh=False) go
    through the cache as applications do, so a killed provider is returned until it is evicted."""
    sim = await Simulation.start(12, seed=5, cache_ttl=30, readvertise_fraction=0.5, **OPTS)
    try:
        await sim.advertise_many([("node-2", "svc.a"), ("node-3", "svc.a")], ttl=60)
        handle = sim.lab.node("node-2")
        assert isinstance(handle, LocalNode)
        assert handle.node.services.ads["svc.a"].timer.interval == pytest.approx(30.0)
        await sim.discover_many([("node-7", "svc.a")], refresh=False)  # fills node-7's cache
        await sim.kill("node-3")
        await sim.discover_many([("node-7", "svc.a")], refresh=False)
        await sim.call_many([("node-7", "svc.a")] * 4)
        ops = sim.operations()
        cached = ops[ops.op == "discover"].iloc[-1]
        assert cached.providers == 2 and cached.dead_providers == 1  # a cache hit: the dead one is still there
        assert cached.messages == 0
        calls = ops[ops.op == "call"]
        assert len(calls) == 4 and (calls.outcome == "ok").all()  # failover past the dead provider
        assert sim.script[-1][0] == "call_many"
    finally:
        await sim.stop()
