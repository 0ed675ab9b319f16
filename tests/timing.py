"""Waiting in tests without betting on the machine's speed (a loaded 2-core CI box).

A fixed sleep followed by an assert fails when the machine is slow; poll the
condition instead, with a deadline far beyond the normal case:

    await eventually(lambda: pool.counters["idle_closed"] == 1, 10, "the idle connection closed")

Lower bounds on durations stay exact (a timer never fires early); upper bounds
get the margin a stalled loop needs, or move to a benchmark (bench/).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any


async def eventually(
    cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition", interval: float = 0.02
) -> Any:
    """Poll ``cond()`` (sync or async) until it is truthy and return its value; AssertionError after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= end:
            raise AssertionError(f"{what} not reached within {timeout:g}s (last value {value!r})")
        await asyncio.sleep(interval)
