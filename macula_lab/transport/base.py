"""The small transport interface every node runs on.

Two implementations: :mod:`.quic` (aioquic, TLS 1.3, ALPN ``macula``) and
:mod:`.memory` (a simulated network for tests and scale studies).  A transport
listens for requests and hands each to the node's handler, and sends requests to
other nodes' endpoints, returning the reply frame.  Sessions (CONNECT /
CONNECT_ACK, see :mod:`macula_lab.core.session`) are set up by the transport the
first time it talks to an endpoint; handlers see the caller's :class:`PeerInfo`.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from ..core.messages import Frame, MessageType
from ..core.session import Identity, PeerInfo
from ..errors import MaculaError, PeerError

log = logging.getLogger(__name__)

#: A handler answers one request: (reply type, reply body).  It may answer at
#: once (return the tuple: the transport replies within the same event-loop pass,
#: no task) or return an awaitable (the transport runs it as a task it owns).
#: The transport sets the reply's ``id`` to the request's.  Raising a
#: MaculaError answers with an ERROR frame carrying its ``code``; any other
#: exception answers ``internal_error`` and is logged.
Reply = tuple[MessageType, dict[str, Any]]
RequestHandler = Callable[[Frame, PeerInfo], "Reply | Awaitable[Reply]"]

DEFAULT_REQUEST_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 5.0


class Transport(ABC):
    """Send requests to endpoints and serve requests from peers."""

    identity: Identity
    #: called with the peer when a session it opened to us ends (attached clients use this)
    on_session_closed: Callable[[PeerInfo], None] | None = None

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Where this transport listens (valid after :meth:`start`)."""

    @abstractmethod
    async def start(self, handler: RequestHandler) -> str:
        """Start listening; returns the endpoint string."""

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
        session (or the transport has no such path): then use :meth:`request`.
        The reply is not checked (see :func:`raise_for_error`); the future fails
        with a :class:`~macula_lab.errors.TransportError` on timeout or close.
        ``notify()`` is called synchronously right after the future completes.
        """
        return None

    @abstractmethod
    async def connect(self, endpoint: str) -> PeerInfo:
        """Open (or reuse) the session with ``endpoint``; returns who is there."""

    @abstractmethod
    async def close(self) -> None:
        """Stop listening, close every connection, cancel every task."""

    async def request_session(
        self, node_id: bytes, mtype: MessageType, body: dict[str, Any], *, timeout: float | None = None
    ) -> Frame:
        """Send a request back over the session that peer ``node_id`` opened to us."""
        from ..errors import ConnectFailed

        raise ConnectFailed(f"{type(self).__name__} cannot send requests into accepted sessions")

    async def abort(self) -> None:
        """Crash without goodbye (peers only notice by timing out); default: close."""
        await self.close()

    def stats(self) -> dict[str, Any]:
        return {}


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
        mtype, body = error_reply(exc.code, str(exc), getattr(exc, "details", None))
    else:  # a handler bug must not take the node down
        log.error("handler for %s from %s failed", frame.type.name, peer.short_id, exc_info=exc)
        mtype, body = error_reply("internal_error", f"{type(exc).__name__}: {exc}")
    body["id"] = frame.body["id"]
    return mtype, body


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
