"""Watches from attached clients and lab nodes: relayed by the node, resumed after a reconnect or a partition."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

import macula_lab
from macula_lab.core.watch import WatchEvent
from macula_lab.errors import QuotaExceeded
from macula_lab.lab.lab import Lab
from macula_lab.runtime.gateway import MAX_WATCHES_PER_CLIENT

from ..conftest import client_args
from ..runtime.test_services import wait_until
from ..runtime.test_watch import changes, current

REALM = "com.test.watch"
SVC = "svc.watched"


async def drain(watch, log: list[WatchEvent]) -> None:
    async for event in watch:
        log.append(event)


async def pending(watch, quiet: float) -> list[WatchEvent]:
    """The events that arrive until none came for ``quiet`` seconds."""
    out = []
    while True:
        try:
            event = await watch.next(timeout=quiet)
        except TimeoutError:
            return out
        if event is None:
            return out
        out.append(event)


async def test_a_client_resumes_after_a_reconnect_and_misses_no_change(nodes, certs):
    n1 = await nodes("node-1", realm=REALM)
    ring = [n1] + [await nodes(f"node-{i}", realm=REALM, bootstrap=[n1.endpoint]) for i in (2, 3, 4)]
    truth: list[tuple[str, str]] = []

    async def advertise(node):
        await node.advertise(SVC, lambda x: x, metadata={"name": node.name})
        truth.append(("added", node.name))

    async def unadvertise(node):
        await node.unadvertise(SVC)
        truth.append(("removed", node.name))

    first: list[WatchEvent] = []
    client = await macula_lab.connect(n1.endpoint, realm=REALM, **client_args(certs))
    watch = client.watch(SVC)
    task = asyncio.create_task(drain(watch, first))
    await wait_until(lambda: first, 10, "the first event")
    await advertise(ring[1])
    await advertise(ring[2])
    await wait_until(lambda: len(changes(first)) == 2, 10, "two changes relayed")
    last = watch.index
    await client.close()  # the session ends: the node stops relaying, keeps watching
    await asyncio.wait_for(task, 5)

    await advertise(ring[3])  # while no client is attached
    await unadvertise(ring[1])
    await asyncio.sleep(0.5)

    second: list[WatchEvent] = []
    client = await macula_lab.connect(n1.endpoint, realm=REALM, **client_args(certs))
    try:
        watch = client.watch(SVC, since=last)
        task = asyncio.create_task(drain(watch, second))
        await wait_until(lambda: len(second) == 2, 10, "the missed changes replayed")
        await unadvertise(ring[2])
        await wait_until(lambda: len(second) == 3, 10, "a live change after the resume")
    finally:
        await client.close()
        await asyncio.wait_for(task, 5)
    assert [e.kind for e in second] != ["reset"] and "reset" not in [e.kind for e in second]
    assert changes(first) + changes(second) == truth  # every change once, in order
    indexes = [e.index for e in first + second]
    assert indexes == list(range(indexes[0], indexes[0] + len(indexes)))
    assert current(first + second) == {"node-4"}
    await wait_until(lambda: n1.gateway.client_watches == {}, 10, "the relays ended with the sessions")


async def test_through_a_partition_on_the_simulated_network_nothing_is_missed():
    lab = await Lab.start(4, transport="memory", realm=REALM, sample_interval=None)
    try:
        client = await lab.attach_client("node-1", name="client-1")
        log: list[WatchEvent] = []
        watch = client.watch(SVC)
        task = asyncio.create_task(drain(watch, log))
        await wait_until(lambda: log, 10, "the first event")
        await lab.node("node-2").advertise(SVC, "echo", metadata={"name": "node-2"})
        await wait_until(lambda: len(changes(log)) == 1, 10, "added")
        lab.network.partition(["client-1"])  # the client alone on its side
        await lab.node("node-3").advertise(SVC, "echo", metadata={"name": "node-3"})
        await lab.node("node-2").unadvertise(SVC)
        await asyncio.sleep(1.0)
        lab.network.heal()
        assert changes(log) == [("added", "node-2")]  # nothing crossed the partition
        # the client notices nothing by itself: it reconnects and resumes where it was
        watch.close()
        await asyncio.wait_for(task, 5)
        again = await lab.attach_client("node-1", name="client-2")
        resumed = again.watch(SVC, since=watch.index)
        got = [await resumed.next(timeout=10), await resumed.next(timeout=10)]
        assert [(e.kind, e.provider.name) for e in got] == [("added", "node-3"), ("removed", "node-2")]
        assert [e.index for e in got] == [watch.index + 1, watch.index + 2]
        resumed.close()
    finally:
        await lab.stop()


async def test_lab_nodes_local_and_attached_watch_alike():
    lab = await Lab.start(3, transport="memory", realm=REALM, sample_interval=None)
    try:
        attached = await lab.attach_client("node-3")
        local = lab.node("node-1").watch(SVC)
        relayed = attached.watch(SVC)
        for w in (local, relayed):
            assert (await w.next(timeout=10)).kind == "reset"
        await lab.node("node-2").advertise(SVC, "echo", metadata={"name": "node-2"})
        a, b = await local.next(timeout=10), await relayed.next(timeout=10)
        assert (a.kind, a.provider.name) == (b.kind, b.provider.name) == ("added", "node-2")
        local.close()
        relayed.close()
    finally:
        await lab.stop()


async def test_a_client_runs_a_bounded_number_of_watches(nodes, certs):
    node = await nodes("node-1", realm=REALM)
    client = await macula_lab.connect(node.endpoint, realm=REALM, **client_args(certs))
    try:
        watches = [client.watch(f"svc.w{i}") for i in range(MAX_WATCHES_PER_CLIENT)]
        for w in watches:
            await w.start()
        with pytest.raises(QuotaExceeded):
            await client.watch("svc.one-too-many").start()
        assert len(node.gateway.client_watches[client.node_id]) == MAX_WATCHES_PER_CLIENT
    finally:
        await client.close()
    await wait_until(lambda: node.gateway.client_watches == {}, 10, "the client's watches ended with its session")
    assert Counter(w.closed for w in watches) == Counter({True: MAX_WATCHES_PER_CLIENT})


async def test_churn_with_reconnects_misses_no_change():
    """Providers come and go, replicas are killed and the client reconnects (since=) between changes."""
    import random

    lab = await Lab.start(10, transport="memory", realm=REALM, sample_interval=None, k=4, watch_interval=2.0)
    rng = random.Random(7)
    truth: list[tuple[str, str]] = []
    seen: list[WatchEvent] = []
    try:
        providers = ["node-2", "node-3", "node-4", "node-5", "node-6"]
        spare = ["node-7", "node-8", "node-9", "node-10"]  # killed as we go: replica churn
        advertising: set[str] = set()
        session = 0
        client = await lab.attach_client("node-1", name=f"client-{session}")
        watch = client.watch(SVC)
        assert (await watch.next(timeout=10)).kind == "reset"

        async def change() -> None:
            who = rng.choice(providers)
            if who in advertising:
                await lab.node(who).unadvertise(SVC)
                advertising.discard(who)
                truth.append(("removed", who))
            else:
                await lab.node(who).advertise(SVC, "echo", ttl=30, metadata={"name": who})
                advertising.add(who)
                truth.append(("added", who))

        away = 0  # changes made while no session was open: the client sees them only by replay
        for step in range(16):
            await change()
            if step % 4 == 1 and spare:
                await lab.kill_node(spare.pop())
            if step % 3 == 2:  # drop the session, change while away, reconnect, resume from the last index
                seen += await pending(watch, 0.3)
                await client.client.close()
                await change()
                away += 1
                session += 1
                client = await lab.attach_client("node-1", name=f"client-{session}")
                watch = client.watch(SVC, since=seen[-1].index if seen else None)
        end = asyncio.get_running_loop().time() + 20
        while len(changes(seen)) < len(truth) and asyncio.get_running_loop().time() < end:
            seen += await pending(watch, 1.0)
        assert away == 5
        assert "reset" not in [e.kind for e in seen], "a resume fell back to a reset"
        assert changes(seen) == truth
        indexes = [e.index for e in seen]
        assert indexes == list(range(indexes[0], indexes[0] + len(indexes)))
    finally:
        await lab.stop()


async def test_a_client_watch_ends_when_its_node_goes_away(nodes, certs):
    node = await nodes("node-1", realm=REALM)
    client = await macula_lab.connect(node.endpoint, realm=REALM, **client_args(certs))
    try:
        watch = client.watch(SVC)
        assert (await watch.next(timeout=10)).kind == "reset"
        await node.stop()
        assert await watch.next(timeout=15) is None  # not a hang: the consumer can reconnect
        assert watch.lost and watch.closed
    finally:
        await client.close()
