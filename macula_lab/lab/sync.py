"""Sync twins for plain scripts: run the lab on an event loop of its own, in a daemon thread.

:class:`AsyncFirst` gives every async method of a lab or a lab node a ``_sync``
twin by one rule (``lab.node("node-1").advertise_sync(...)``, ``lab.sample_sync()``)
and makes an un-awaited call from a script an error rather than a silent no-op.

As ipyparallel does: ``Lab.start_sync()`` starts (once per process) a thread
running an asyncio loop forever and runs every coroutine of that lab there,
so the nodes' timers keep firing between the script's calls.  In a notebook,
use the async API (``await Lab.start()``) instead: the kernel's loop is
already running and the widgets live on it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
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


class NotAwaited(MaculaError, RuntimeError):
    """An async method was called where nothing can await it (no event loop runs in this thread)."""

    code = "not_awaited"


def _needs_loop(name: str, func):
    """``func`` (a coroutine function) refusing to make a coroutine nothing could await."""

    @functools.wraps(func)
    def call(self, *args, **kwargs):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise NotAwaited(
                f"{type(self).__name__}.{name}() is async and no event loop runs here: in a script use "
                f".{name}_sync(...) instead; in a notebook write await ...{name}(...)"
            ) from None
        return func(self, *args, **kwargs)

    call._async_first = func  # the coroutine function itself, for the twin
    return call


class AsyncFirst:
    """Async methods first, and a ``NAME_sync`` twin of each, made by one rule (as ipyparallel does).

    Every ``async def`` of a subclass:

    - called with no event loop running in the thread (a plain script), raises
      :class:`NotAwaited` naming its twin, instead of returning a coroutine that
      never runs (Python only warns, later, that it was never awaited);
    - has a twin ``NAME_sync(...)`` (found by ``__getattr__``, listed by ``dir``)
      that runs it on the object's loop (:meth:`_sync_loop`) from another thread
      and returns its result.
    """

    sync_timeout: float | None = DEFAULT_TIMEOUT

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        for name, value in list(vars(cls).items()):
            if inspect.iscoroutinefunction(value) and not name.startswith("_"):
                setattr(cls, name, _needs_loop(name, value))

    def _sync_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop this object's coroutines run on (None: not started)."""
        raise NotImplementedError

    @classmethod
    def _async_methods(cls) -> list[str]:
        return sorted(
            name for name in dir(cls) if hasattr(getattr(cls, name, None), "_async_first")
        )

    def __getattr__(self, name: str) -> Any:
        if name.endswith("_sync") and not name.startswith("_"):
            method = getattr(type(self), name[: -len("_sync")], None)
            func = getattr(method, "_async_first", None)
            if func is not None:
                return self._twin(name, func)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _twin(self, name: str, func):
        @functools.wraps(func)
        def twin(*args: Any, **kwargs: Any) -> Any:
            loop = self._sync_loop()
            if loop is None:
                raise NotAwaited(f"{name}: {type(self).__name__} has no event loop (it was never started)")
            return run(func(self, *args, **kwargs), loop, self.sync_timeout)

        twin.__name__ = twin.__qualname__ = name
        twin.__doc__ = f"Sync twin of :meth:`{func.__name__}` for plain scripts (runs it on the object's loop).\n\n{func.__doc__ or ''}"
        return twin

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *(f"{n}_sync" for n in self._async_methods())})
