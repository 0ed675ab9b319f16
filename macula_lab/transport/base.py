"""The transport contract every node runs on, implemented by QUIC and by the simulated network.

Two implementations: :mod:`.quic` (aioquic, TLS 1.3, ALPN ``macula``) and
:mod:`.memory` (a simulated network for tests and scale studies).  They offer
the same things, so the runtime takes the same code path on both:

- **sessions**: the first request to an endpoint opens a session (CONNECT /
  CONNECT_ACK, see :mod:`macula_lab.core.session`); :meth:`Transport.connect`
  opens one explicitly, :meth:`Transport.session` says who is behind an open
  one, and :attr:`Transport.on_session_closed` is told when a session a peer
  opened to us ends (an attached client left);
- **requests**: :meth:`Transport.request` (a coroutine, connects if needed)
  and :meth:`Transport.send_request` (sends at once over an open session and
  returns the reply future, with an optional synchronous ``notify``);
  :meth:`Transport.request_session` sends a request *back* over a session a
  peer opened to us (how a node relays calls to an attached client);
- **serving**: :meth:`Transport.start` takes the node's request handler; each
  request is answered with the handler's reply (at once, or as a task the
  transport owns), its ``id`` set to the request's;
- **timeouts**: every request has one (``request_timeout`` by default), every
  handshake ``connect_timeout``; nothing waits forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from ..core.messages import Frame, MessageType
from ..core.params import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT
from ..core.session import Identity, PeerInfo
from ..errors import MaculaError, PeerError

log = logging.getLogger(__name__)

__all__ = [
    "QuietLog",
    "Reply",
    "RequestHandler",
    "Transport",
    "answer",
    "error_for",
    "error_reply",
    "raise_for_error",
    "run_handler",
]

#: A handler answers one request: (reply type, reply body).  It may answer at
#: once (return the tuple: the transport replies within the same event-loop pass,
#: no task) or return an awaitable (the transport runs it as a task it owns).
#: The transport sets the reply's ``id`` to the request's.  Raising a
#: MaculaError answers with an ERROR frame carrying its ``code``; any other
#: exception answers ``internal_error`` and is logged.
Reply = tuple[MessageType, dict[str, Any]]
RequestHandler = Callable[[Frame, PeerInfo], "Reply | Awaitable[Reply]"]


class Transport(ABC):
    """Send requests to endpoints and serve requests from peers (see the module docstring)."""

    identity: Identity
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    #: called with the peer when a session it opened to us ends (attached clients use this)
    on_session_closed: Callable[[PeerInfo], None] | None = None

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Where this transport listens (valid after :meth:`start`; "" for a pure client)."""

    @abstractmethod
    async def start(self, handler: RequestHandler) -> str:
        """Start serving requests with ``handler`` (and listening, unless a pure client); returns the endpoint."""

    @abstractmethod
    async def request(
        self, endpoint: str, mtype: MessageType, body: dict[str, Any], *, timeout: float | None = None
    ) -> Frame:
        """Send one request and return its reply.

        Raises :class:`~macula_lab.errors.PeerError` when the peer answers
        with an ERROR frame, :class:`~macula_lab.errors.RealmMismatch` when it
        refuses the session, and a :class:`~macula_lab.errors.TransportError`
        (timeout, unreachable, certificate, closed) otherwise.
        """

    @abstractmethod
    def send_request(
        self,
        endpoint: str,
        mtype: MessageType,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
        notify: Callable[[], None] | None = None,
    ) -> asyncio.Future[Frame] | None:
        """Send over an already open session at once; the future gets the raw reply.

        A fast path for callers that wait on many requests (DHT lookups): no
        coroutine or task per request.  Returns None when there is no open
        session: then use :meth:`request`.  The reply is not checked (see
        :func:`raise_for_error`); the future fails with a
        :class:`~macula_lab.errors.TransportError` on timeout or close.
        ``notify()`` is called synchronously right after the future completes.
        """

    @abstractmethod
    async def connect(self, endpoint: str) -> PeerInfo:
        """Open (or reuse) the session with ``endpoint``; returns who is there."""

    @abstractmethod
    def session(self, endpoint: str) -> PeerInfo | None:
        """The peer behind an open session with ``endpoint``, or None."""

    @abstractmethod
    async def request_session(
        self, node_id: bytes, mtype: MessageType, body: dict[str, Any], *, timeout: float | None = None
    ) -> Frame:
        """Send a request back over the session that peer ``node_id`` opened to us.

        Raises :class:`~macula_lab.errors.ConnectionClosed` if there is none.
        """

    @abstractmethod
    async def close(self) -> None:
        """Stop listening, close every connection, cancel every task."""

    async def abort(self) -> None:
        """Crash without goodbye (peers only notice by timing out); default: close."""
        await self.close()

    def stats(self) -> dict[str, Any]:
        return {}


class QuietLog:
    """Warnings about what peers send, at most one per ``interval`` seconds (the rest are counted).

    A peer sending 5,000 bad frames must not write 5,000 log lines: the counters
    in ``/metrics`` say how many; the log says that it happens, and how often.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0):
        self.logger = logger
        self.interval = interval
        self._last = float("-inf")
        self._suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" (and {self._suppressed} more like it in the last {now - self._last:.0f}s, not logged)"
            self._suppressed = 0
        self._last = now
        self.logger.warning(msg, *args)


def answer(handler: RequestHandler, frame: Frame, peer: PeerInfo) -> Reply | Awaitable[Reply]:
    """Start answering ``frame``: a Reply now, or an awaitable giving it later.

    Synchronous handlers are answered without a task (the fast path for PING,
    DHT queries and plain-function procedures); failures become ERROR replies.
    """
    try:
        result = handler(frame, peer)
    except Exception as exc:
        return _failure(exc, frame, peer)
    if isinstance(result, tuple):
        result[1]["id"] = frame.body["id"]
        return result
    return _finish(result, frame, peer)


async def run_handler(handler: RequestHandler, frame: Frame, peer: PeerInfo) -> Reply:
    """Run a request handler to completion and turn failures into ERROR replies."""
    result = answer(handler, frame, peer)
    return result if isinstance(result, tuple) else await result


async def _finish(awaitable: Awaitable[Reply], frame: Frame, peer: PeerInfo) -> Reply:
    try:
        mtype, body = await awaitable
    except Exception as exc:
        return _failure(exc, frame, peer)
    body["id"] = frame.body["id"]
    return mtype, body


def _failure(exc: Exception, frame: Frame, peer: PeerInfo) -> Reply:
    if isinstance(exc, MaculaError):
        mtype, body = error_for(exc)
    else:  # a handler bug must not take the node down
        log.error("handler for %s from %s failed", frame.type.name, peer.short_id, exc_info=exc)
        mtype, body = error_reply("internal_error", f"{type(exc).__name__}: {exc}")
    body["id"] = frame.body["id"]
    return mtype, body


def error_for(exc: MaculaError) -> Reply:
    """The ERROR reply naming ``exc`` (its code, message and details, such as the invalid field)."""
    return error_reply(exc.code, str(exc), getattr(exc, "details", None))


def error_reply(code: str, message: str, details: dict | None = None) -> Reply:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return MessageType.ERROR, body


def raise_for_error(frame: Frame) -> Frame:
    """Turn an ERROR reply into :class:`PeerError`; pass other replies through."""
    if frame.type is MessageType.ERROR:
        raise PeerError(frame.body["code"], frame.body["message"], frame.body.get("details"))
    return frame


def wall_time() -> float:
    """Seconds since the epoch, as the running loop sees them.

    A simulation's loop runs on virtual time and says what the epoch time is
    (``loop.wall_time()``); every other loop is real, so ``time.time()``.
    Event times, samples and advertisement sequence numbers read this, so a
    simulated run stamps them with simulated time and replays identically.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return time.time()
    clock = getattr(loop, "wall_time", None)
    return clock() if clock is not None else time.time()
