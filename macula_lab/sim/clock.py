"""An asyncio event loop on virtual time: when nothing is ready, time jumps to the next timer.

Timeouts, latencies, TTLs and re-advertisements then pass at CPU speed while
the node code reads ``loop.time()`` as it always does.  The loop only moves
time while someone is driving it (:attr:`VirtualTimeLoop.driving` > 0: a
simulation command is running); otherwise it is paused and blocks on its
self-pipe like any idle loop, so a simulation between two commands neither
burns CPU nor ages.

Every clock jump goes into the loop's trace hash (:meth:`note`), and so does
whatever the simulated network notes for each delivered frame: two runs that
did the same things in the same order at the same virtual times hash equal.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import selectors
import struct
import threading
from typing import Any

#: what the loop reports as the epoch time at virtual time 0 (fixed: replays stamp the same times)
EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class _JumpingSelector:
    """The loop's selector, asked to wait ``timeout`` seconds: jump instead (when driven)."""

    def __init__(self, inner: selectors.BaseSelector, loop: VirtualTimeLoop):
        self._inner = inner
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        loop = self._loop
        if timeout is not None and timeout > 0 and loop.driving:
            # nothing ready, a timer due later: that is where time goes next
            loop._jump(loop._scheduled[0]._when)  # type: ignore[attr-defined]
            timeout = 0
        if timeout is None or timeout > 0:
            # paused (or nothing scheduled): block until another thread hands us a command.
            # Commands arrive only now, with nothing ready, so where they land in the
            # ready queue does not depend on thread timing (see VirtualTimeLoop.submit)
            loop.idle.set()
            try:
                return self._inner.select(None)
            finally:
                loop.idle.clear()
        return self._inner.select(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is virtual.  Run it in its own thread."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self.driving = 0
        self.jumps = 0
        #: set while the loop waits for a command with nothing to do
        self.idle = threading.Event()
        self._trace = hashlib.blake2b(digest_size=16)
        self._selector = _JumpingSelector(self._selector, self)  # type: ignore[has-type]

    async def wait_idle(self) -> None:
        """From another thread's loop: until this loop waits for a command with nothing ready."""
        # a threading.Event set by another thread: an asyncio.Event could not be set from there
        while not self.idle.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.001)

    def time(self) -> float:
        return self._now

    def wall_time(self) -> float:
        """Seconds since the epoch on this clock (what node code stamps events and seqs with)."""
        return EPOCH + self._now

    def _jump(self, when: float) -> None:
        if when > self._now and math.isfinite(when):
            self._now = when
            self.jumps += 1
            self._trace.update(struct.pack("<d", when))

    def note(self, *parts: bytes | str) -> None:
        """Add one event (a delivery) to the trace, stamped with the current virtual time."""
        h = self._trace
        h.update(struct.pack("<d", self._now))
        for p in parts:
            h.update(p.encode() if isinstance(p, str) else p)
            h.update(b"\0")

    def trace_hash(self) -> str:
        return self._trace.copy().hexdigest()
