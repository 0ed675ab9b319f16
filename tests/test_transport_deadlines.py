"""DeadlineQueue: one loop timer for many request deadlines."""

from __future__ import annotations

import asyncio

from macula_lab.transport import deadlines
from macula_lab.transport.deadlines import DeadlineQueue


class Item:
    """A request stand-in: records when it expired."""

    def __init__(self, name: str, log: list, t0: float = 0.0) -> None:
        self.name, self.log, self.t0 = name, log, t0
        self.done = False

    def expire(self) -> None:
        self.log.append((self.name, asyncio.get_running_loop().time() - self.t0))


class CountingQueue(DeadlineQueue):
    """Counts how often the loop timer is (re-)armed."""

    arms = 0

    def _arm(self, when: float) -> None:
        self.arms += 1
        super()._arm(when)


async def test_fires_in_order_never_early_and_at_most_granularity_late():
    loop = asyncio.get_running_loop()
    q = DeadlineQueue(granularity=0.02)
    fired: list[tuple[str, float]] = []
    t0 = loop.time()
    delays = {"c": 0.09, "a": 0.03, "b": 0.05}
    for name, delay in delays.items():
        q.add(t0 + delay, Item(name, fired, t0))
    await asyncio.sleep(0.2)
    assert [name for name, _ in fired] == ["a", "b", "c"]
    for name, at in fired:
        assert delays[name] <= at < delays[name] + 0.02 + 0.03  # granularity, plus scheduling slack
    assert len(q) == 0


async def test_items_that_ended_are_not_expired():
    loop = asyncio.get_running_loop()
    q = DeadlineQueue()
    fired: list = []
    answered, pending = Item("answered", fired), Item("pending", fired)
    q.add(loop.time() + 0.02, answered)
    q.add(loop.time() + 0.02, pending)
    answered.done = True
    await asyncio.sleep(0.08)
    assert [name for name, _ in fired] == ["pending"]


async def test_a_shorter_deadline_after_a_long_one_fires_on_time():
    loop = asyncio.get_running_loop()
    q = DeadlineQueue()
    fired: list = []
    t0 = loop.time()
    q.add(t0 + 5.0, Item("long", fired))
    q.add(t0 + 0.05, Item("short", fired))
    await asyncio.sleep(0.12)
    assert [name for name, _ in fired] == ["short"]
    assert len(q) == 1  # the long one waits, with the timer armed for it


async def test_many_deadlines_share_one_timer():
    loop = asyncio.get_running_loop()
    q = CountingQueue(granularity=0.01)
    fired: list = []
    t0 = loop.time()
    for i in range(1000):  # later and later, as requests sent one after another are
        q.add(t0 + 0.02 + i * 0.00005, Item(str(i), fired))
    assert q.arms == 1  # pushing a later deadline never touches the loop timer
    await asyncio.sleep(0.15)
    assert [name for name, _ in fired] == [str(i) for i in range(1000)]
    assert q.arms <= 1 + 0.05 / 0.01 + 1  # re-armed at most once per granularity after that


async def test_ended_items_do_not_pile_up(monkeypatch):
    """Answered requests with long timeouts are dropped before their deadline."""
    monkeypatch.setattr(deadlines, "COMPACT_AT", 100)
    loop = asyncio.get_running_loop()
    q = DeadlineQueue()
    fired: list = []
    live = []
    for i in range(1000):
        item = Item(str(i), fired)
        q.add(loop.time() + 60.0, item)
        if i % 10:
            item.done = True  # answered
        else:
            live.append(item)
    assert len(q) < 300  # ~100 live ones plus what accumulated since the last rebuild
    assert fired == [] and all(any(e[2] is item for e in q._heap) for item in live)


async def test_a_failing_item_does_not_strand_the_others(caplog):
    loop = asyncio.get_running_loop()
    q = DeadlineQueue()
    fired: list = []

    class Boom(Item):
        def expire(self) -> None:
            raise RuntimeError("boom")

    now = loop.time()
    q.add(now + 0.01, Boom("boom", fired))
    q.add(now + 0.01, Item("after", fired))
    q.add(now + 0.05, Item("later", fired))
    await asyncio.sleep(0.12)
    assert [name for name, _ in fired] == ["after", "later"]
    assert "expiring" in caplog.text
