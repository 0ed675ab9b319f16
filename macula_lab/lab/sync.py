"""Sync twins for plain scripts: run the lab on an event loop of its own, in a daemon thread.

As ipyparallel does: ``Lab.start_sync()`` starts (once per process) a thread
running an asyncio loop forever and runs every coroutine of that lab there,
so the nodes' timers keep firing between the script's calls.  In a notebook,
use the async API (``await Lab.start()``) instead: the kernel's loop is
already running and the widgets live on it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..errors import MaculaError

T = TypeVar("T")
DEFAULT_TIMEOUT = 300.0


class WrongLoop(MaculaError, RuntimeError):
    code = "wrong_loop"


_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The shared background loop (started on first use, a daemon thread)."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="macula-lab-loop", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def run(coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop, timeout: float | None) -> T:
    """Run ``coro`` on ``loop`` (another thread's) and wait for its result."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise WrongLoop("a *_sync method was called from the lab's own loop: await the async method instead")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise
