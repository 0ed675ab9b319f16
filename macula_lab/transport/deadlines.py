"""Request deadlines: one loop timer per transport instead of one per request.

Nearly every request is answered long before its deadline, so a timer per
request would only be pushed onto asyncio's timer heap and later popped to do
nothing.  With hundreds of requests a second that heap holds thousands of
handles, and every push and pop compares them in Python (``TimerHandle.__lt__``)
- aioquic's own per-connection timers pay for it too.  In ``bench/dht.py`` at
N=60 the per-request timers cost about 10% of a lookup.

Here a deadline is a ``(when, seq, a, b)`` tuple of plain values (the caller's
key for the request, e.g. a connection number and a request id) on a
:mod:`heapq`, compared in C and never seen by the garbage collector.  Nothing
is cancelled: when a deadline comes due, ``expire(a, b)`` is called and decides
whether anything is left to expire.  Keys of requests that ended are also
dropped in bulk when they make up most of the heap (``pending(a, b)`` tells),
so long timeouts under heavy traffic cannot pile up memory.  One loop timer is
armed at the earliest deadline; after it fires it is re-armed at most once per
``granularity``, so a deadline fires at most that much late, never early.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)

#: How late a deadline may fire (seconds): the price of one timer for many requests.
DEFAULT_GRANULARITY = 0.01
#: The heap is rebuilt without ended requests once it holds this many entries (then
#: twice as many as the rebuild kept, and at least this many)
COMPACT_AT = 4096


class DeadlineQueue:
    """Call ``expire(a, b)`` once loop time ``when`` has passed; entries are not cancelled."""

    def __init__(
        self,
        expire: Callable[[Hashable, Hashable], None],
        pending: Callable[[Hashable, Hashable], bool],
        *,
        granularity: float = DEFAULT_GRANULARITY,
    ) -> None:
        self._expire = expire
        self._pending = pending
        self.granularity = granularity
        self._heap: list[tuple[float, int, Hashable, Hashable]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._compact_at = COMPACT_AT

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, a: Hashable, b: Hashable) -> None:
        # a NaN deadline would break the heap's order and silence every later deadline; an
        # infinite one never fires: refuse both here too, whatever a caller let through
        if not math.isfinite(when):
            raise ValueError(f"a request deadline must be a finite loop time, got {when!r}")
        heapq.heappush(self._heap, (when, next(self._seq), a, b))
        if len(self._heap) >= self._compact_at:
            self._compact()
        # re-arm only for a deadline clearly earlier than the timer (a shorter timeout);
        # the usual case, a deadline later than every pending one, costs just the push
        if self._timer is None or when < self._timer_at - self.granularity:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        heap = self._heap
        now = asyncio.get_running_loop().time()
        due = []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap))
        for _when, _seq, a, b in due:
            try:
                self._expire(a, b)
            except Exception:  # one faulty entry must not strand the others
                log.exception("expiring %r %r failed", a, b)
        if heap and self._timer is None:  # (a callback may have armed it already)
            self._arm(max(heap[0][0], now + self.granularity))

    def _compact(self) -> None:
        pending = self._pending
        self._heap = [entry for entry in self._heap if pending(entry[2], entry[3])]
        heapq.heapify(self._heap)
        self._compact_at = max(COMPACT_AT, 2 * len(self._heap))
