"""What every part of a node shares: identity, transport, request routing, procedures and tasks.

A :class:`Host` is what the DHT, the services, the client gateway and the
inspector are handed (never the node that composes them, so no part imports
another's owner).  Through it a part

- answers requests of a message type (:meth:`route`) and learns who sent them
  (:meth:`observe_peers`), and hears when a peer's session ends
  (:meth:`on_session_closed`);
- answers CALLs of a named procedure (:meth:`procedure`);
- runs background work the host owns (:meth:`spawn`: cancelled on stop,
  failures logged, never orphaned);
- sends requests through the transport (:meth:`request`, :meth:`send_request`,
  :meth:`connect`, :meth:`session`, :meth:`request_session`), all bounded by
  timeouts.

An attached client is a host with nothing plugged in but its own procedures.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ..core.messages import Frame, MessageType, new_id
from ..core.session import Identity, PeerInfo
from ..errors import HandlerError, MaculaError, NotStarted, ServiceUnavailable
from ..transport.base import Reply, RequestHandler, Transport, wall_time

log = logging.getLogger(__name__)

Procedure = Callable[[Any, PeerInfo], Any]  # returns the result, or an awaitable of it


class NoSuchProcedure(MaculaError):
    code = "no_such_procedure"


class UnknownRequest(MaculaError):
    code = "unknown_request"


class Host:
    """The node's request router, procedure table and task owner over one transport."""

    def __init__(self, identity: Identity, transport: Transport, *, request_timeout: float, debug: bool = False):
        self.identity = identity
        self.transport = transport
        self.request_timeout = request_timeout
        self.debug = debug
        self.started_at: float | None = None
        self._handlers: dict[MessageType, RequestHandler] = {}
        self._peer_observers: list[Callable[[PeerInfo], None]] = []
        self._session_listeners: list[Callable[[PeerInfo], None]] = []
        self._procedures: dict[str, tuple[Procedure, bool]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._running = False
        self._stopping = False
        transport.on_session_closed = self._session_closed
        self.route(MessageType.PING, _on_ping)
        self.route(MessageType.CALL, self._on_call)

    # ------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def node_id(self) -> bytes:
        return self.identity.node_id

    @property
    def realm(self) -> str:
        return self.identity.realm

    @property
    def endpoint(self) -> str:
        return self.transport.endpoint

    @property
    def connect_timeout(self) -> float:
        return self.transport.connect_timeout

    @property
    def running(self) -> bool:
        return self._running

    @staticmethod
    def now() -> float:
        """The clock every part uses: the running loop's."""
        return asyncio.get_running_loop().time()

    @staticmethod
    def wall_time() -> float:
        return wall_time()

    # ----------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await self.transport.start(self.dispatch)
        self._running = True
        self.started_at = asyncio.get_running_loop().time()

    async def stop(self, *, graceful: bool = True) -> None:
        """Cancel every task the host owns, then close (or, not ``graceful``, abort) the transport."""
        self._stopping = True  # spawn() refuses from now on, so this loop ends
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await (self.transport.close() if graceful else self.transport.abort())
        self._running = False
        self._stopping = False

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task | None:
        """Run ``coro`` as a task owned by this host: cancelled on stop, failures logged.

        A host that is not running (or is stopping) starts nothing: returns None.
        """
        if not self._running or self._stopping:
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background task %s failed", self.name, task.get_name(), exc_info=task.exception())

    @property
    def tasks(self) -> set[asyncio.Task]:
        return set(self._tasks)

    # -------------------------------------------------------------- serving
    def route(self, mtype: MessageType, handler: RequestHandler) -> None:
        """Serve requests of ``mtype`` with ``handler`` (replaces any previous one)."""
        self._handlers[mtype] = handler

    def observe_peers(self, fn: Callable[[PeerInfo], None]) -> None:
        """Call ``fn(peer)`` for every request received (the DHT learns contacts this way)."""
        self._peer_observers.append(fn)

    def on_session_closed(self, fn: Callable[[PeerInfo], None]) -> None:
        """Call ``fn(peer)`` when a session a peer opened to us ends (attached clients leave)."""
        self._session_listeners.append(fn)

    def _session_closed(self, peer: PeerInfo) -> None:
        for fn in list(self._session_listeners):
            try:
                fn(peer)
            except Exception:  # one listener's bug must not keep the others from hearing it
                log.exception("%s: session-closed listener failed", self.name)

    def dispatch(self, frame: Frame, peer: PeerInfo) -> Reply | Awaitable[Reply]:
        """The transport's request handler: tell the observers, then the type's handler."""
        for observe in self._peer_observers:
            observe(peer)
        handler = self._handlers.get(frame.type)
        if handler is None:
            raise UnknownRequest(f"this node does not serve {frame.type.name} requests")
        return handler(frame, peer)

    def procedure(self, name: str, fn: Procedure) -> None:
        """Answer CALLs of ``name`` with ``fn(args, peer)`` (a function or a coroutine function).

        Plain functions are answered within the event-loop pass that received
        the call (no task): keep them short.  Coroutine functions run as tasks.
        """
        self._procedures[name] = (fn, inspect.iscoroutinefunction(fn))

    def remove_procedure(self, name: str) -> None:
        self._procedures.pop(name, None)

    def has_procedure(self, name: str) -> bool:
        return name in self._procedures

    def _on_call(self, frame: Frame, peer: PeerInfo) -> Reply | Awaitable[Reply]:
        name = frame.body["procedure"]
        entry = self._procedures.get(name)
        if entry is None:
            raise NoSuchProcedure(f"no procedure {name!r} on node {self.name}")
        fn, is_async = entry
        if is_async:
            return self._reply_later(fn(frame.body["args"], peer))
        try:
            result = fn(frame.body["args"], peer)
        except Exception as exc:  # the handler's failure, reported by name to the caller
            raise self._handler_error(exc) from exc
        if inspect.isawaitable(result):  # a plain function that returned a coroutine
            return self._reply_later(result)
        return MessageType.REPLY, {"result": result}

    async def _reply_later(self, pending: Awaitable[Any]) -> Reply:
        try:
            result = await pending
        except Exception as exc:  # the handler's failure, reported by name to the caller
            raise self._handler_error(exc) from exc
        return MessageType.REPLY, {"result": result}

    def _handler_error(self, exc: Exception) -> MaculaError:
        if isinstance(exc, HandlerError | ServiceUnavailable):
            return exc  # already says what happened (a relayed handler, an unreachable client)
        details = {"type": type(exc).__name__, "message": str(exc)}
        if self.debug:  # no server stack traces unless asked for
            details["traceback"] = "".join(traceback.format_exception(exc))
        return HandlerError(f"{type(exc).__name__}: {exc}", details)

    # ------------------------------------------------------------- sending
    def _check_running(self) -> None:
        if not self._running:
            raise NotStarted(f"node {self.name} is not started")

    async def request(
        self, endpoint: str, mtype: MessageType, body: dict[str, Any], *, timeout: float | None = None
    ) -> Frame:
        """One request/reply (connecting first if needed); see :meth:`Transport.request`."""
        self._check_running()
        return await self.transport.request(endpoint, mtype, body, timeout=timeout)

    def send_request(
        self,
        endpoint: str,
        mtype: MessageType,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
        notify: Callable[[], None] | None = None,
    ) -> asyncio.Future[Frame] | None:
        """:meth:`Transport.send_request`: send at once over an open session, or None."""
        self._check_running()
        return self.transport.send_request(endpoint, mtype, body, timeout=timeout, notify=notify)

    async def connect(self, endpoint: str) -> PeerInfo:
        self._check_running()
        return await self.transport.connect(endpoint)

    def session(self, endpoint: str) -> PeerInfo | None:
        """Who is behind the open session with ``endpoint`` (None: no session)."""
        return self.transport.session(endpoint)

    async def request_session(
        self, node_id: bytes, mtype: MessageType, body: dict[str, Any], *, timeout: float | None = None
    ) -> Frame:
        """A request back over the session peer ``node_id`` opened to us (relayed calls)."""
        self._check_running()
        return await self.transport.request_session(node_id, mtype, body, timeout=timeout)

    async def ping(self, endpoint: str, *, timeout: float | None = None) -> float:
        """Round-trip time of an app-level PING to ``endpoint`` (seconds)."""
        t0 = self.now()
        await self.request(endpoint, MessageType.PING, {"id": new_id()}, timeout=timeout)
        return self.now() - t0

    async def call_procedure(
        self, endpoint: str, procedure: str, args: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Call a procedure on the node at ``endpoint`` directly (no discovery)."""
        reply = await self.request(
            endpoint, MessageType.CALL, {"procedure": procedure, "args": args}, timeout=timeout
        )
        return reply.body["result"]


def _on_ping(frame: Frame, peer: PeerInfo) -> Reply:
    return MessageType.PONG, {}


def as_procedure(handler: Callable[[Any], Any]) -> Procedure:
    """A service handler ``(args) -> result`` as a procedure ``(args, peer) -> result`` (async stays async)."""
    if inspect.iscoroutinefunction(handler):

        async def call_async(args: Any, peer: PeerInfo) -> Any:
            return await handler(args)

        return call_async

    def call_sync(args: Any, peer: PeerInfo) -> Any:
        return handler(args)

    return call_sync

