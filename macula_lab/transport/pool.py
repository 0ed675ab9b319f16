"""A bounded pool of outgoing connections keyed by peer endpoint.

- Reuse: N requests to one peer cost one QUIC + session handshake.
- Concurrent first requests to the same endpoint share one connect attempt.
- Bounded: at most ``max_size`` connections; the least recently used one is
  closed to make room (LRU).
- Kept alive: a connection unused for ``keepalive_interval`` is pinged (an app
  PING, which also proves the peer's node loop is alive); a failed ping drops it.
- Idle ones close: a connection unused for ``idle_timeout`` is closed.

The pool is generic over the connection object: it needs ``last_used`` (loop
time of the last activity) and ``is_closed``; connecting, pinging and closing
are callables given by the transport.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from ..core.endpoint import normalize_endpoint
from ..errors import MaculaError

log = logging.getLogger(__name__)


class PooledConnection(Protocol):
    last_used: float

    @property
    def is_closed(self) -> bool: ...


C = TypeVar("C", bound=PooledConnection)


class ConnectionPool(Generic[C]):
    def __init__(
        self,
        connect: Callable[[str], Awaitable[C]],
        *,
        ping: Callable[[C], Awaitable[None]],
        close: Callable[[C], Awaitable[None]],
        max_size: int = 256,
        idle_timeout: float = 120.0,
        keepalive_interval: float = 20.0,
    ):
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self._connect = connect
        self._ping = ping
        self._close = close
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.keepalive_interval = keepalive_interval
        self._conns: OrderedDict[str, C] = OrderedDict()
        self._connecting: dict[str, asyncio.Future[C]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._maintainer: asyncio.Task | None = None
        self.counters = {"connects": 0, "reuses": 0, "evictions": 0, "idle_closed": 0, "ping_failures": 0}

    # ------------------------------------------------------------------ use
    def get_nowait(self, endpoint: str) -> C | None:
        """The open connection to ``endpoint`` if there is one (no await: the hot path)."""
        key = normalize_endpoint(endpoint)
        conn = self._conns.get(key)
        if conn is None or conn.is_closed:
            return None
        self._conns.move_to_end(key)
        self.counters["reuses"] += 1
        return conn

    async def get(self, endpoint: str) -> C:
        key = normalize_endpoint(endpoint)
        conn = self._conns.get(key)
        if conn is not None and not conn.is_closed:
            self._conns.move_to_end(key)
            self.counters["reuses"] += 1
            return conn
        if conn is not None:
            del self._conns[key]
        pending = self._connecting.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._connecting[key] = pending
            task = asyncio.get_running_loop().create_task(self._open(key, pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # shield: one waiter cancelling must not cancel the shared connect
        return await asyncio.shield(pending)

    async def _open(self, key: str, pending: asyncio.Future[C]) -> None:
        try:
            conn = await self._connect(key)
        except BaseException as exc:
            if not pending.done():
                pending.set_exception(exc)
                pending.exception()  # mark retrieved: waiters may all have gone
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        finally:
            self._connecting.pop(key, None)
        self.counters["connects"] += 1
        self._conns[key] = conn
        self._conns.move_to_end(key)
        while len(self._conns) > self.max_size:
            old_key, old = self._conns.popitem(last=False)
            self.counters["evictions"] += 1
            log.debug("pool full: closing least recently used connection to %s", old_key)
            self._spawn(self._close(old))
        if not pending.done():
            pending.set_result(conn)

    def peek(self, endpoint: str) -> C | None:
        conn = self._conns.get(normalize_endpoint(endpoint))
        return conn if conn is not None and not conn.is_closed else None

    def discard(self, endpoint: str, conn: C | None = None) -> None:
        """Forget a connection (closed or failed); the next get() reconnects."""
        try:
            key = normalize_endpoint(endpoint)
        except MaculaError:
            return
        current = self._conns.get(key)
        if current is not None and (conn is None or current is conn):
            del self._conns[key]
            if not current.is_closed:
                self._spawn(self._close(current))

    def __len__(self) -> int:
        return len(self._conns)

    def endpoints(self) -> list[str]:
        return list(self._conns)

    def stats(self) -> dict[str, Any]:
        return {"open": len(self._conns), "connecting": len(self._connecting), **self.counters}

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._maintainer is None:
            self._maintainer = asyncio.get_running_loop().create_task(self._maintain())

    async def close_all(self, closer: Callable[[C], Awaitable[None]] | None = None) -> None:
        """Close every connection (with ``closer`` instead of the pool's close, if given)."""
        closer = closer or self._close
        if self._maintainer is not None:
            self._maintainer.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
            self._maintainer = None
        conns = list(self._conns.values())
        self._conns.clear()
        for fut in self._connecting.values():
            if not fut.done():
                fut.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(closer(c) for c in conns), return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _maintain(self) -> None:
        period = max(0.05, min(self.keepalive_interval, self.idle_timeout) / 2)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for key, conn in list(self._conns.items()):
                idle = now - conn.last_used
                if conn.is_closed:
                    self._conns.pop(key, None)
                elif idle >= self.idle_timeout:
                    self.counters["idle_closed"] += 1
                    log.debug("closing idle connection to %s (%.0fs unused)", key, idle)
                    self._conns.pop(key, None)
                    self._spawn(self._close(conn))
                elif idle >= self.keepalive_interval:
                    self._spawn(self._keepalive(key, conn))

    async def _keepalive(self, key: str, conn: C) -> None:
        last = conn.last_used
        try:
            await self._ping(conn)
        except (MaculaError, OSError) as exc:
            self.counters["ping_failures"] += 1
            log.info("keep-alive ping to %s failed (%s): dropping the connection", key, exc)
            self.discard(key, conn)
        else:
            conn.last_used = last  # a keep-alive ping is not use: idle time keeps counting
