"""Watches over real QUIC on loopback (mutual TLS): every change seen once, pushed, resumable.

The watcher is chosen *not* to be a replica of the key (small k, the node
farthest from it), so what it sees comes over the network: the replicas'
pushes and its reconciliation reads.  ``missed_by_push`` counts changes a read
found before any push delivered them: with pushes working it stays 0.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from macula_lab.core.ids import service_key, xor_distance
from macula_lab.core.watch import WatchEvent
from macula_lab.runtime.prometheus import node_registry

from .test_prometheus import scrape, value
from .test_services import mesh, wait_until

R = "com.test.watch"
SVC = "svc.watched"
KEY = service_key(R, SVC)


def by_distance(nodes):
    return sorted(nodes, key=lambda n: xor_distance(n.node_id, KEY))


async def collect(watch, log: list[WatchEvent]) -> None:
    async for event in watch:
        log.append(event)


def changes(log: list[WatchEvent]) -> list[tuple[str, str]]:
    return [(e.kind, e.provider.name) for e in log if e.kind != "reset"]


def current(log: list[WatchEvent]) -> set[str]:
    """The provider set the events describe (a reset replaces it)."""
    names: set[str] = set()
    for e in log:
        if e.kind == "reset":
            names = {p.name for p in e.providers}
        elif e.kind in ("added", "updated"):
            names.add(e.provider.name)
        else:
            names.discard(e.provider.name)
    return names


def meta(node) -> dict:
    return {"name": node.name}


async def test_added_removed_and_expired_are_pushed_to_a_watcher_that_is_no_replica(nodes):
    ring = await mesh(nodes, [f"node-{i}" for i in range(1, 7)], realm=R, k=3, watch_interval=30.0)
    watcher = by_distance(ring)[-1]
    a, b = [n for n in by_distance(ring) if n is not watcher][:2]
    log: list[WatchEvent] = []
    watch = watcher.watch(SVC)
    task = asyncio.create_task(collect(watch, log))
    try:
        await wait_until(lambda: log, 10, "the first event")
        assert log[0].kind == "reset" and log[0].providers == ()
        await a.advertise(SVC, lambda x: x, ttl=300, metadata=meta(a))
        await wait_until(lambda: changes(log) == [("added", a.name)], 10, "added")
        await b.advertise(SVC, lambda x: x, ttl=2, metadata=meta(b))
        await wait_until(lambda: len(changes(log)) == 2, 10, "the second provider")
        b.services.stop_readvertising(SVC)  # its record lapses at the replicas
        await a.unadvertise(SVC)
        await wait_until(lambda: len(changes(log)) == 4, 15, "removed and expired")
        assert Counter(changes(log)) == Counter(
            [("added", a.name), ("added", b.name), ("removed", a.name), ("expired", b.name)]
        )
        indexes = [e.index for e in log]
        assert indexes == sorted(set(indexes)) and indexes[1:] == list(range(indexes[0] + 1, indexes[0] + 5))
        assert watcher.dht.get_local(KEY) == []  # it learned nothing as a replica
        assert watcher.watches.counters["pushes_received"] >= 4
        assert watcher.watches.counters["missed_by_push"] == 0
        assert current(log) == set()
        metrics = scrape(node_registry(watcher))
        assert value(metrics["macula_watches"], "macula_watches") == 1
        assert value(metrics["macula_watch_missed_by_push"], "macula_watch_missed_by_push_total") == 0
        replica = scrape(node_registry(by_distance(ring)[0]))
        assert value(replica["macula_watch_subscriptions"], "macula_watch_subscriptions") >= 1
        assert value(replica["macula_watch_pushes_sent"], "macula_watch_pushes_sent_total") >= 1
    finally:
        watch.close()
        await asyncio.wait_for(task, 5)  # closing ends the iteration


async def test_without_pushes_reads_catch_every_change_within_the_interval(nodes):
    ring = await mesh(nodes, [f"node-{i}" for i in range(1, 6)], realm=R, k=3, watch_interval=1.0)
    for n in ring:
        n.watches.pushing = False  # every push lost
    watcher = by_distance(ring)[-1]
    a = by_distance(ring)[0]
    watch = watcher.watch(SVC)
    assert (await watch.next(timeout=10)).kind == "reset"
    loop = asyncio.get_running_loop()
    actions = (lambda: a.advertise(SVC, lambda x: x, metadata=meta(a)), lambda: a.unadvertise(SVC))
    for action, kind in zip(actions, ("added", "removed"), strict=True):
        t0 = loop.time()
        await action()
        event = await watch.next(timeout=10)
        assert (event.kind, event.provider.name) == (kind, a.name)
        # the bound: one interval, plus a lookup and a WATCH round (generous for a loaded VM)
        assert loop.time() - t0 < 1.0 + 3.0
    assert watcher.watches.counters["missed_by_push"] == 2 and watcher.watches.counters["pushes_received"] == 0
    watch.close()


async def test_resume_replays_held_events_and_resets_otherwise(nodes):
    ring = await mesh(nodes, ["node-1", "node-2", "node-3"], realm=R)
    first = ring[0].watch(SVC)
    start = await first.next(timeout=10)
    await ring[1].advertise(SVC, lambda x: x, metadata=meta(ring[1]))
    added = await first.next(timeout=10)
    assert (added.kind, added.provider.name, added.index) == ("added", "node-2", start.index + 1)
    first.close()
    await ring[2].advertise(SVC, lambda x: x, metadata=meta(ring[2]))
    await ring[1].unadvertise(SVC)
    again = ring[0].watch(SVC, since=added.index)
    got = [await again.next(timeout=10), await again.next(timeout=10)]
    assert [(e.kind, e.provider.name) for e in got] == [("added", "node-3"), ("removed", "node-2")]
    assert [e.index for e in got] == [added.index + 1, added.index + 2]
    again.close()
    # an index this node does not hold (another node's): the whole set instead
    other = ring[0].watch(SVC, since=1)
    reset = await other.next(timeout=10)
    assert reset.kind == "reset" and [p.name for p in reset.providers] == ["node-3"]
    other.close()


async def test_churn_with_replica_and_provider_kills_misses_nothing(nodes):
    names = [f"node-{i}" for i in range(1, 11)]
    ring = await mesh(nodes, names, realm=R, k=4, watch_interval=2.0)
    order = by_distance(ring)
    watcher = order[-1]
    replicas = order[:2]  # the two closest: killed below (no provider among them)
    providers = [n for n in order[2:-1]][:5]
    # a ttl that outlasts a re-advertisement slowed by dead replicas (with 4 s, records
    # really lapsed at the replicas before the republication landed, and came back)
    log: list[WatchEvent] = []
    watch = watcher.watch(SVC)
    task = asyncio.create_task(collect(watch, log))
    try:
        await wait_until(lambda: log, 10, "the first event")
        for p in providers[:4]:
            await p.advertise(SVC, lambda x: x, ttl=10, metadata=meta(p))
        await wait_until(lambda: len(changes(log)) == 4, 15, "four providers")
        for r in replicas:
            await r.kill()  # no goodbye: subscriptions there are lost
        await providers[4].advertise(SVC, lambda x: x, ttl=10, metadata=meta(providers[4]))
        await providers[1].unadvertise(SVC)
        await providers[2].kill()  # its record lapses at its ttl
        expected = Counter(
            [("added", p.name) for p in providers]
            + [("removed", providers[1].name), ("expired", providers[2].name)]
        )
        try:
            await wait_until(lambda: Counter(changes(log)) == expected, 30, "the changes")
        except AssertionError:
            raise AssertionError(f"expected {sorted(expected)}, got {changes(log)}") from None
        await asyncio.sleep(3)  # two more reads: nothing comes back, nothing is reported twice
        assert Counter(changes(log)) == expected, changes(log)
        assert current(log) == {providers[i].name for i in (0, 3, 4)}
        indexes = [e.index for e in log]
        assert indexes == list(range(indexes[0], indexes[0] + len(log)))
    finally:
        watch.close()
        await asyncio.wait_for(task, 5)


async def test_stopping_the_node_ends_its_watches(nodes):
    node = await nodes("node-1", realm=R)
    watch = node.watch(SVC)
    assert (await watch.next(timeout=10)).kind == "reset"
    await node.stop()
    assert await watch.next(timeout=5) is None


async def test_a_watch_of_a_bad_name_is_refused(nodes):
    node = await nodes("node-1", realm=R)
    with pytest.raises(ValueError):
        node.watch("bad name")
    with pytest.raises(ValueError):
        node.watch(SVC, since=-1)
