"""DeadlineQueue: one loop timer for many request deadlines."""

from __future__ import annotations

import asyncio

from macula_lab.transport import deadlines
from macula_lab.transport.deadlines import DeadlineQueue

from ..timing import eventually


class Requests:
    """Stand-in for a transport: which requests are pending, and when each expired."""

    def __init__(self) -> None:
        self.t0 = asyncio.get_running_loop().time()
        self.pending: set[tuple] = set()
        self.fired: list[tuple[str, float]] = []

    def expire(self, conn: int, rid: str) -> None:
        if (conn, rid) in self.pending:
            self.pending.discard((conn, rid))
            self.fired.append((rid, asyncio.get_running_loop().time() - self.t0))

    def is_pending(self, conn: int, rid: str) -> bool:
        return (conn, rid) in self.pending

    def queue(self, cls=DeadlineQueue, **kw) -> DeadlineQueue:
        return cls(self.expire, self.is_pending, **kw)

    def send(self, q: DeadlineQueue, rid: str, timeout: float, conn: int = 1) -> None:
        self.pending.add((conn, rid))
        q.add(self.t0 + timeout, conn, rid)

    def names(self) -> list[str]:
        return [rid for rid, _ in self.fired]


class CountingQueue(DeadlineQueue):
    """Counts how often the loop timer is (re-)armed."""

    arms = 0

    def _arm(self, when: float) -> None:
        self.arms += 1
        super()._arm(when)


async def test_fires_in_order_never_early_and_at_most_granularity_late():
    r = Requests()
    q = r.queue(granularity=0.02)
    timeouts = {"c": 0.09, "a": 0.03, "b": 0.05}
    for rid, timeout in timeouts.items():
        r.send(q, rid, timeout)
    await eventually(lambda: len(r.fired) == 3, 10)
    assert r.names() == ["a", "b", "c"]
    for rid, at in r.fired:
        # never early; late by the granularity, plus what a loaded machine's loop may stall
        assert timeouts[rid] <= at < timeouts[rid] + 0.02 + 1.0
    assert len(q) == 0


async def test_answered_requests_are_left_alone():
    r = Requests()
    q = r.queue()
    r.send(q, "answered", 0.02)
    r.send(q, "waiting", 0.02)
    r.pending.discard((1, "answered"))
    await eventually(lambda: r.fired, 10)  # (both were due at once: expired in one pass)
    assert r.names() == ["waiting"]


async def test_a_shorter_deadline_after_a_long_one_fires_on_time():
    r = Requests()
    q = r.queue()
    r.send(q, "long", 5.0)
    r.send(q, "short", 0.05)
    await eventually(lambda: r.fired, 10)
    assert r.names() == ["short"]
    assert len(q) == 1  # the long one waits, with the timer armed for it


async def test_many_deadlines_share_one_timer():
    r = Requests()
    q = r.queue(CountingQueue, granularity=0.01)
    for i in range(1000):  # later and later, as requests sent one after another are
        r.send(q, str(i), 0.02 + i * 0.00005)
    assert q.arms == 1  # pushing a later deadline never touches the loop timer
    await eventually(lambda: len(r.fired) == 1000, 10)
    assert r.names() == [str(i) for i in range(1000)]
    assert q.arms <= 1 + 0.05 / 0.01 + 1  # re-armed at most once per granularity after that


async def test_ended_requests_do_not_pile_up(monkeypatch):
    """Answered requests with long timeouts are dropped before their deadline."""
    monkeypatch.setattr(deadlines, "COMPACT_AT", 100)
    r = Requests()
    q = r.queue()
    for i in range(1000):
        r.send(q, str(i), 60.0)
        if i % 10:
            r.pending.discard((1, str(i)))  # answered
    assert len(q) < 300  # the ~100 pending ones plus what came since the last rebuild
    kept = {entry[3] for entry in q._heap}
    assert {rid for _, rid in r.pending} <= kept and r.fired == []


async def test_a_failing_expiry_does_not_strand_the_others(caplog):
    r = Requests()

    def expire(conn: int, rid: str) -> None:
        if rid == "boom":
            raise RuntimeError("boom")
        r.expire(conn, rid)

    q = DeadlineQueue(expire, r.is_pending)
    for rid, timeout in (("boom", 0.01), ("after", 0.01), ("later", 0.05)):
        r.send(q, rid, timeout)
    await eventually(lambda: len(r.fired) == 2, 10)
    assert r.names() == ["after", "later"]
    assert "expiring" in caplog.text
