"""QUIC transport: aioquic, TLS 1.3, ALPN ``macula``, certificates verified by default.

One :class:`QuicTransport` per node.  It listens on a UDP port (port 0 by
default in labs and tests) and keeps a bounded pool of outgoing connections
(:mod:`.pool`) keyed by peer endpoint.  Every connection starts with the session
handshake (CONNECT -> CONNECT_ACK | ERROR realm_mismatch) on its first stream.

Framing on streams: 8-byte header + msgpack map (:mod:`macula_lab.core.codec`),
reassembled by a per-stream :class:`FrameDecoder`, so a frame may be split
across QUIC chunks and a chunk may carry several frames (the reference's gateway
decoded one frame per chunk).  Replies are matched by request id.

Stream use (measured with ``bench/transport.py``; see the note in ``STREAM_MODE``
below): requests are *multiplexed on one long-lived bidirectional stream per
connection* by default.  The alternative, a fresh stream per request, is kept as
``stream_mode="per-request"`` for comparison and for workloads where one large
reply must not delay small ones (head-of-line blocking inside one stream).

Both ends of a connection can send requests: the node that accepted the
connection opens its own long-lived stream towards the connecting peer (this is
how a node relays calls to an attached client, and how a DHT node reuses a
session a verified peer opened to it).

Two paths send a request: :meth:`MaculaProtocol.request` (a coroutine) and
:meth:`QuicTransport.send_request`, which sends at once over an open session
and returns the reply's future, optionally with a synchronous ``notify`` (DHT
lookups wait on several queries this way, without a task per query).

ACKs: aioquic acknowledges 1 ms after an ack-eliciting packet, in a datagram of
its own.  A request arriving on an idle connection has its ACK carried by the
reply instead (``_ack_now``): a lone query/reply costs 3 datagrams, not 4.  On
a busy connection ACKs stay delayed and batched.

Request deadlines of all of a node's connections share one coarse loop timer
(:mod:`.deadlines`) instead of one timer per connection re-armed for nearly
every request of a sparse DHT connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import socket
import ssl
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode

from ..core.codec import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, encode
from ..core.endpoint import Endpoint, parse_endpoint
from ..core.messages import REPLY_TYPES, Frame, MessageType, new_id
from ..core.params import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT
from ..core.session import Identity, PeerInfo, accept_connect, connect_body, peer_from_ack
from ..errors import (
    CertificateError,
    CodecError,
    ConnectFailed,
    ConnectionClosed,
    ConnectTimeout,
    FrameTooLarge,
    IdentityMismatch,
    MaculaError,
    NotStarted,
    RealmMismatch,
    RequestTimeout,
    TruncatedFrame,
    Unauthenticated,
)
from . import aioquic_compat as compat
from .base import (
    QuietLog,
    Reply,
    RequestHandler,
    Transport,
    answer,
    error_for,
    error_reply,
    raise_for_error,
)
from .certs import cert_node_id, load_cert
from .deadlines import DeadlineQueue
from .pool import ConnectionPool
from .verify import TrustedCA, verify_peer

log = logging.getLogger(__name__)

ALPN = "macula"
#: Default stream use, chosen by measurement (bench/transport.py, loopback, 2-core VM,
#: 64-byte bodies): one long-lived multiplexed stream per connection gave ~22k req/s
#: with 64 in flight and 170 us sequential p50, a stream per request ~12k req/s and
#: 190 us.  Multiplexing avoids per-stream state, FIN handling and MAX_STREAMS
#: updates and lets many small frames share one packet.  Its cost, head-of-line
#: blocking behind a large frame or a lost packet, is why "per-request" stays
#: available (TLS-verified loopback shows no loss; a lossy WAN might favour it).
STREAM_MODE = "multiplex"
STREAM_MODES = ("multiplex", "per-request")

#: At most this many requests from one connection are handled at once; more get
#: an ERROR ``busy`` (a peer cannot make us spawn unbounded tasks).
MAX_INFLIGHT_PER_CONNECTION = 1024
_ZERO_ID = bytes(16)
#: A request arriving after this long without one (an idle connection) gets its ACK
#: in the reply's packet instead of a datagram of its own; see _ack_now()
ACK_BATCH_WINDOW = 0.002

# What one peer can make a node hold (see QuicTransport.admit and _housekeeping).
#: incoming connections at once, and from one source address (the lab's in-process
#: nodes all come from 127.0.0.1, so this is well above a lab's size)
MAX_INCOMING = 2048
MAX_INCOMING_PER_ADDRESS = 512
#: sessions one authenticated node id may hold to us at once (a reconnect replaces the oldest)
MAX_SESSIONS_PER_PEER = 4
#: a connection that has not completed TLS and CONNECT after this long is closed
SESSION_DEADLINE = 10.0
#: bytes of unfinished frames one connection may make us buffer, and how long one may stay unfinished
MAX_PARTIAL_BYTES = 2 * DEFAULT_MAX_FRAME_SIZE
PARTIAL_FRAME_DEADLINE = 20.0
HOUSEKEEPING_INTERVAL = 1.0
# QUIC application error codes (stream resets / connection close)
APP_ERR_BAD_FRAME = 0x1
APP_ERR_REALM = 0x2
_CRYPTO_ERROR_BASE = QuicErrorCode.CRYPTO_ERROR  # 0x100 + TLS alert


@dataclass(frozen=True)
class TlsConfig:
    """Certificate files of a node or client.  ``verify=False`` disables peer verification (loudly)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    verify: bool = True

    @classmethod
    def from_node_cert(cls, nc: Any, *, verify: bool = True) -> TlsConfig:
        return cls(cert=str(nc.cert), key=str(nc.key), ca=str(nc.ca), verify=verify)

    def bound_node_id(self) -> bytes | None:
        """The node id our certificate binds (None: no certificate, or one that binds none)."""
        return cert_node_id(load_cert(self.cert)) if self.cert else None


class _Stream:
    __slots__ = ("decoder", "peer_ended", "inflight", "dead", "partial_since")

    def __init__(self, max_frame_size: int):
        self.decoder = FrameDecoder(max_frame_size=max_frame_size)
        self.peer_ended = False
        self.inflight = 0
        self.dead = False
        self.partial_since: float | None = None  # when an unfinished frame started to be buffered


class _Waiting:
    """A request in flight: its reply future, deadline, and who to tell when it ends."""

    __slots__ = ("fut", "stream_id", "mtype", "timeout", "deadline", "notify")

    def __init__(self, fut, stream_id, mtype, timeout, deadline, notify):
        self.fut: asyncio.Future[Frame] = fut
        self.stream_id: int = stream_id
        self.mtype: MessageType = mtype
        self.timeout: float = timeout
        self.deadline: float = deadline
        self.notify: Callable[[], None] | None = notify

    def settle(self, result: Frame | None = None, exc: BaseException | None = None) -> None:
        if self.fut.done():  # the requester gave up (cancelled)
            return
        if exc is None:
            self.fut.set_result(result)
        else:
            self.fut.set_exception(exc)
        if self.notify is not None:
            self.notify()


class MaculaProtocol(QuicConnectionProtocol):
    """One QUIC connection, either side.  Decodes frames, serves requests, matches replies."""

    def __init__(self, quic: QuicConnection, stream_handler=None, *, owner: QuicTransport, outgoing: bool):
        super().__init__(quic, stream_handler)
        self.owner = owner
        self.outgoing = outgoing
        self.serial = owner.register(self)  # this connection's key in the owner's deadline queue
        self.peer: PeerInfo | None = None  # set once the session handshake succeeded
        self.refused: MaculaError | None = None
        self.endpoint = ""  # outgoing: the endpoint we dialled
        self.verified_endpoint = ""  # incoming: the client's endpoint, vouched for by its certificate
        self.last_used = self.opened_at = self._loop.time()
        self.address = ""  # incoming: the source address (set by the first datagram)
        self.session_ended = False  # incoming: the transport told its owner this session ended
        self.main_stream: int | None = None
        self._streams: dict[int, _Stream] = {}
        self._partial_bytes = 0  # unfinished frames buffered over all streams
        # requests in flight by request id (their deadlines are in the transport's DeadlineQueue)
        self._pending: dict[bytes, _Waiting] = {}
        self._tasks: set[asyncio.Task] = set()
        self.terminated: events.ConnectionTerminated | None = None
        # see transmit(): whether to flush later in this loop pass, and the scheduled flush
        self._defer_flush = False
        self._flush_handle: asyncio.Handle | None = None
        self._last_request_at = float("-inf")  # see _ack_now()

    # ------------------------------------------------------------ requests
    @property
    def is_closed(self) -> bool:
        return self.terminated is not None or compat.protocol_closed(self)

    async def request(self, mtype: MessageType, body: dict[str, Any], timeout: float) -> Frame:
        """Send one request on this connection and wait for its reply."""
        fut = self.send_request(mtype, body, timeout)
        try:
            return await fut
        finally:  # cancelled by the caller: forget it now rather than at its deadline
            self._pending.pop(body["id"], None)

    def send_request(
        self,
        mtype: MessageType,
        body: dict[str, Any],
        timeout: float,
        notify: Callable[[], None] | None = None,
    ) -> asyncio.Future[Frame]:
        """Send one request now; the future gets the reply frame.

        Or :class:`RequestTimeout` after ``timeout``, or :class:`ConnectionClosed`.
        Every way it completes also clears its bookkeeping, so a caller may keep
        the future without awaiting it (the DHT lets a straggler run on this way).
        ``notify`` is called right after the future completes, synchronously: a
        caller waiting on several requests wakes one loop pass sooner than through
        the future's done callbacks (which ``asyncio.wait`` relays once more).
        """
        if self.is_closed:
            raise ConnectionClosed(f"connection to {self.endpoint or 'peer'} is closed")
        rid = body.get("id")
        if rid is None:
            rid = body["id"] = new_id()
        data = encode(mtype, body, max_frame_size=self.owner.max_frame_size)
        per_request = self.owner.stream_mode == "per-request"
        if per_request:
            stream_id = self._quic.get_next_available_stream_id()
        else:
            if self.main_stream is None:  # the accepting side's first request: its own long-lived stream
                self.main_stream = self._quic.get_next_available_stream_id()
            stream_id = self.main_stream
        fut: asyncio.Future[Frame] = self._loop.create_future()
        self.last_used = now = self._loop.time()
        self.owner.deadlines.add(now + timeout, self.serial, rid)  # first: it refuses a NaN timeout
        self._pending[rid] = _Waiting(fut, stream_id, mtype, timeout, now + timeout, notify)
        try:
            self._quic.send_stream_data(stream_id, data, end_stream=per_request)
        except BaseException:
            del self._pending[rid]
            raise
        if len(self._pending) == 1:
            # the only request in flight: send now rather than one loop pass later
            # (transmit() joins a flush that is already scheduled, if any)
            self.transmit()
        else:  # others are being sent too: let them share datagrams
            self._flush_soon()
        return fut

    def expire(self, rid: bytes) -> None:
        """Request ``rid``'s deadline came (see :class:`~.deadlines.DeadlineQueue`): fail it if it is still pending."""
        waiting = self._pending.get(rid)
        if waiting is None or waiting.deadline > self._loop.time():
            return  # answered or cancelled (or its id reused by a later request)
        del self._pending[rid]
        where = self.endpoint or self._peer_label()
        waiting.settle(
            exc=RequestTimeout(f"{waiting.mtype.name} to {where} got no reply within {waiting.timeout:g}s")
        )

    async def handshake(self, identity: Identity, timeout: float) -> PeerInfo:
        """Client side of the session: CONNECT on the stream that becomes the main stream."""
        self.main_stream = self._quic.get_next_available_stream_id()
        body = connect_body(identity)
        rid = body["id"]
        fut: asyncio.Future[Frame] = self._loop.create_future()
        # (no deadline entry: asyncio.timeout below bounds the handshake)
        self._pending[rid] = _Waiting(fut, self.main_stream, MessageType.CONNECT, timeout, math.inf, None)
        end = self.owner.stream_mode == "per-request"
        self._quic.send_stream_data(self.main_stream, encode(MessageType.CONNECT, body), end_stream=end)
        self.transmit()
        try:
            async with asyncio.timeout(timeout):
                reply = await fut
        except TimeoutError:
            raise ConnectTimeout(f"{self.endpoint}: no answer to CONNECT within {timeout:g}s") from None
        finally:
            self._pending.pop(rid, None)
        if end:
            self.main_stream = None
        peer = peer_from_ack(identity, reply, self.endpoint)
        self.owner.check_server_claims(self, peer)
        self.peer = peer
        return self.peer

    def _peer_label(self) -> str:
        return self.peer.name or self.peer.short_id if self.peer else "peer"

    # ------------------------------------------------------------ sending
    # aioquic calls transmit() after every datagram received and every timer.  When
    # that datagram woke up a requester (a reply) or started a handler task, those
    # will write frames in the next loop pass; flushing now would send a datagram
    # without them (at best an empty pass through aioquic's packet builder, ~13 µs)
    # and a second one a pass later.  So transmit() then schedules one flush after
    # them instead, and every transmit() until it runs joins it.  Deferring by one
    # pass is what _transmit_soon() does anyway; ACKs and timers are unharmed.
    def transmit(self) -> None:
        if self._defer_flush or self._flush_handle is not None:
            self._defer_flush = False
            self._flush_soon()
        else:
            self._flush()

    def _flush_soon(self) -> None:
        """Transmit once the callbacks already queued for the next loop pass have run."""
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        transport = compat.datagram_transport(self)
        if transport is not None and not transport.is_closing():  # closed meanwhile: nothing to do
            super().transmit()

    # -------------------------------------------------------------- events
    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self._on_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            self._on_reset(event.stream_id)
        elif isinstance(event, events.ConnectionTerminated):
            self._on_terminated(event)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        if not self.outgoing and not self.address:  # a new incoming connection: admit it or not
            self.address = str(addr[0])  # (after aioquic took the datagram: it knows where to answer)
            self.owner.admit(self)

    def _on_data(self, stream_id: int, data: bytes, end: bool) -> None:
        st = self._streams.get(stream_id)
        if st is None:
            st = self._streams[stream_id] = _Stream(self.owner.max_frame_size)
        if st.dead:
            return
        self.last_used = now = self._loop.time()
        before = st.decoder.buffered
        items = st.decoder.feed(data) if data else ()
        self._track_partial(st, before, now)
        if self._partial_bytes > MAX_PARTIAL_BYTES:  # a peer pinning our memory in unfinished frames
            self._refuse_stream(
                stream_id, st, FrameTooLarge(f"over {MAX_PARTIAL_BYTES} bytes of unfinished frames"), None
            )
            return
        for item in items:
            if item is st.decoder.failed:  # framing lost: answer once, stop reading
                self._refuse_stream(stream_id, st, item, None)
                return
            self._on_item(stream_id, st, item)
        if end:
            self._partial_bytes -= st.decoder.buffered  # finish() lets go of an unfinished tail
            st.partial_since = None
            try:
                st.decoder.finish()
            except CodecError as exc:
                self._refuse_stream(stream_id, st, exc, None)
                return
            st.peer_ended = True
            if st.inflight == 0 and self._peer_initiated(stream_id):
                # every reply to this stream has been written: close our side too
                self._send_fin(stream_id)
            self._maybe_forget(stream_id, st)  # (only the end of the stream can make it forgettable)

    def _track_partial(self, st: _Stream, before: int, now: float) -> None:
        after = st.decoder.buffered
        self._partial_bytes += after - before
        if after and not before:
            st.partial_since = now
        elif not after:
            st.partial_since = None

    def overdue_partial(self, now: float) -> list[int]:
        """Streams holding an unfinished frame for longer than PARTIAL_FRAME_DEADLINE."""
        return [
            sid
            for sid, st in self._streams.items()
            if st.partial_since is not None and not st.dead and now - st.partial_since > PARTIAL_FRAME_DEADLINE
        ]

    def drop_stream(self, stream_id: int, reason: str) -> None:
        st = self._streams.get(stream_id)
        if st is not None and not st.dead:
            self._refuse_stream(stream_id, st, TruncatedFrame(reason), None)
            self.transmit()

    def _ack_now(self) -> None:
        """Let the next packet we send carry the ACK of what we received (a reply, usually).

        aioquic delays ACKs by 1 ms and then sends them in a datagram of their own.
        On a busy connection that batches many packets into one ACK; but a request
        on an idle connection (a DHT query, typically) would get a datagram of its
        own for the ACK a millisecond after the reply: a fourth packet for one
        request/reply, built, encrypted, sent, received and processed.  So the reply
        to such a request carries the ACK.
        """
        compat.ack_with_next_packet(self._quic, self._loop.time())

    def _peer_initiated(self, stream_id: int) -> bool:
        # QUIC stream ids: bit 0 is 0 for client-initiated, 1 for server-initiated streams
        return (stream_id & 1) == (1 if self.outgoing else 0)

    def _send_fin(self, stream_id: int) -> None:
        try:
            self._quic.send_stream_data(stream_id, b"", end_stream=True)
        except Exception as exc:  # already finished or reset by the peer
            log.debug("cannot finish stream %d: %s", stream_id, exc)
        # (called while aioquic delivers events: its transmit() right after sends the FIN)

    def _on_item(self, stream_id: int, st: _Stream, item: Frame | CodecError) -> None:
        if isinstance(item, CodecError):
            self.owner.counters["bad_frames"] += 1
            self.owner.peer_log.warning("bad frame from %s: %s", self._peer_label(), item)
            self._send(
                stream_id, st, *error_for(item), rid=getattr(item, "request_id", None)
            )
            return
        if item.type in REPLY_TYPES:
            waiting = self._pending.pop(item.body["id"], None)
            if waiting is not None:
                waiting.settle(item)
                self._defer_flush = True  # the requester may send again: flush after it
            return  # a late or unknown reply is dropped (its requester gave up)
        self._on_request(stream_id, st, item)

    def _on_request(self, stream_id: int, st: _Stream, frame: Frame) -> None:
        rid = frame.body["id"]
        now = self._loop.time()
        if now - self._last_request_at > ACK_BATCH_WINDOW:
            self._ack_now()
        self._last_request_at = now
        if frame.type is MessageType.CONNECT:
            if self.outgoing:
                self._send(
                    stream_id, st, *error_reply("unexpected", "CONNECT on an outgoing connection"), rid=rid
                )
                return
            if self.peer is not None:  # one identity per connection: no switching after the fact
                self._send(stream_id, st, *error_reply("already_connected", "this connection has a session"), rid=rid)
                return
            try:
                peer, mtype, body = accept_connect(self.owner.identity, frame)
            except CodecError as exc:
                self._send(stream_id, st, *error_for(exc), rid=rid)
                return
            refusal = None
            if mtype is not MessageType.CONNECT_ACK:
                refusal = RealmMismatch(body["message"], ours=self.owner.identity.realm, theirs=peer.realm)
            else:
                refusal = self.owner.check_claims(self, peer)  # who the certificate says it is
                if refusal is not None:
                    mtype, body = error_for(refusal)
            if refusal is None:
                self.peer = peer
                self.refused = None
                self.owner.admit_session(self, peer)
                self.owner.mark_verified(self, peer)
                log.debug("session from %s (%s) at %s", peer.name, peer.short_id, peer.endpoint or "-")
            else:
                self.refused = refusal
                self.owner.counters["refused_sessions"] += 1
                self.owner.peer_log.warning("refused session from %s: %s", peer.name or peer.short_id, refusal)
            self._send(stream_id, st, mtype, body, rid=rid)
            return
        if self.peer is None:
            refused = self.refused
            code, msg = (refused.code, str(refused)) if refused else ("not_connected", "send CONNECT first")
            self._send(stream_id, st, *error_reply(code, msg), rid=rid)
            return
        if len(self._tasks) >= MAX_INFLIGHT_PER_CONNECTION:
            self._send(stream_id, st, *error_reply("busy", "too many requests in flight"), rid=rid)
            return
        self.owner.counters["requests_served"] += 1
        result = answer(self.owner.handler, frame, self.peer)
        if isinstance(result, tuple):  # answered at once: reply in this same pass
            self._send(stream_id, st, *result, rid=rid)
            return
        st.inflight += 1
        self._defer_flush = True  # flush after the task's first step: a quick reply shares it
        self._tasks.add(self._loop.create_task(self._serve(stream_id, st, result, rid)))

    async def _serve(self, stream_id: int, st: _Stream, pending: Awaitable[Reply], rid: bytes) -> None:
        try:
            mtype, body = await pending
        finally:
            st.inflight -= 1
            # cheaper than a done callback (one less loop callback per request); a task
            # cancelled before it started stays in the set, but only a dying connection
            # cancels its tasks
            self._tasks.discard(asyncio.current_task())
        if not self.is_closed:
            self._send(stream_id, st, mtype, body, rid=rid)
            if self._tasks:  # other handlers may reply in this pass too: share datagrams
                self._flush_soon()
            else:  # the only one: send now (joins a flush already scheduled, if any)
                self.transmit()
        self._maybe_forget(stream_id, st)

    def _send(
        self, stream_id: int, st: _Stream, mtype: MessageType, body: dict, *, rid: bytes | None
    ) -> None:
        body["id"] = rid if rid is not None else _ZERO_ID
        try:
            data = encode(mtype, body, max_frame_size=self.owner.max_frame_size)
        except CodecError as exc:  # e.g. a handler returned something unserialisable
            log.error("cannot encode %s reply: %s", mtype.name, exc)
            data = encode(MessageType.ERROR, {"id": body["id"], "code": exc.code, "message": str(exc)})
        # finish the stream with the last reply once the peer has finished it
        end = st.peer_ended and st.inflight == 0 and self._peer_initiated(stream_id)
        try:
            self._quic.send_stream_data(stream_id, data, end_stream=end)
        except Exception as exc:  # stream already reset / finished by the peer
            log.debug("cannot send on stream %d: %s", stream_id, exc)

    def _refuse_stream(self, stream_id: int, st: _Stream, exc: CodecError, rid: bytes | None) -> None:
        self.owner.counters["bad_frames"] += 1
        self.owner.peer_log.warning("abandoning stream %d from %s: %s", stream_id, self._peer_label(), exc)
        st.dead = True
        st.peer_ended = True
        self._partial_bytes -= st.decoder.buffered
        st.decoder = FrameDecoder(max_frame_size=0)  # let go of what it held
        st.partial_since = None
        self._send(stream_id, st, *error_for(exc), rid=rid)
        try:
            self._quic.stop_stream(stream_id, APP_ERR_BAD_FRAME)
        except ValueError:
            pass
        # (called while aioquic delivers events: its transmit() right after sends all this)

    def _maybe_forget(self, stream_id: int, st: _Stream) -> None:
        if st.peer_ended and st.inflight == 0:
            self._streams.pop(stream_id, None)

    def _on_reset(self, stream_id: int) -> None:
        st = self._streams.pop(stream_id, None)
        if st is not None:
            self._partial_bytes -= st.decoder.buffered
        for rid, w in list(self._pending.items()):
            if w.stream_id == stream_id:
                del self._pending[rid]
                w.settle(exc=ConnectionClosed(f"peer reset stream {stream_id}"))

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        self.terminated = event
        exc = self.owner.termination_error(self, event)
        self._fail_pending(exc)
        self._cancel_handlers()
        self.owner.forget(self)

    def _fail_pending(self, exc: MaculaError) -> None:
        pending, self._pending = self._pending, {}
        for w in pending.values():
            w.settle(exc=exc)

    def _cancel_handlers(self) -> None:
        # one pass later: a handler task created in this pass has not started yet, and
        # cancelling it now would drop its handler coroutine unawaited (a warning, and
        # for async handlers no chance to clean up)
        for task in list(self._tasks):
            self._loop.call_soon(task.cancel)

    def crash(self) -> None:
        """Vanish without a CONNECTION_CLOSE: the peer only notices by timing out."""
        compat.drop_connected_waiter(self)
        self._cancel_handlers()
        self._fail_pending(ConnectionClosed("connection aborted locally"))
        compat.stop_timer(self)
        self.terminated = self.terminated or events.ConnectionTerminated(
            error_code=QuicErrorCode.NO_ERROR, frame_type=None, reason_phrase="aborted"
        )
        udp = compat.datagram_transport(self)
        if self.outgoing and udp is not None:
            udp.close()

    def abort(self, reason: str = "closing") -> None:
        """Close the connection and cancel its request handlers."""
        compat.drop_connected_waiter(self)
        self._cancel_handlers()
        if not self.is_closed:
            self.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=reason)


class QuicTransport(Transport):
    """The node's QUIC endpoint: a listener plus a pool of outgoing connections."""

    def __init__(
        self,
        identity: Identity,
        *,
        listen: str | None = "quic://127.0.0.1:0",
        advertise: str | None = None,
        tls: TlsConfig | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        stream_mode: str = STREAM_MODE,
        pool_size: int = 256,
        idle_timeout: float = 120.0,
        keepalive_interval: float = 20.0,
        retry: bool = True,
    ):
        if stream_mode not in STREAM_MODES:
            raise ValueError(f"stream_mode must be one of {STREAM_MODES}, got {stream_mode!r}")
        self.identity = identity
        self.tls = tls or TlsConfig()
        self.max_frame_size = max_frame_size
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.stream_mode = stream_mode
        self._listen = parse_endpoint(listen) if listen else None
        self._advertise = advertise
        self._server: QuicServer | None = None
        #: QUIC Retry (address validation): a handshake from a spoofed address costs us nothing
        self.retry = retry
        self._incoming: set[MaculaProtocol] = set()
        self._per_address: dict[str, int] = {}  # incoming connections by source address
        self._housekeeper: asyncio.Task | None = None
        # incoming sessions whose client proved, with a certificate of the lab CA valid for
        # its claimed endpoint's host, that it is the node listening there: requests to that
        # endpoint may use them instead of dialling a connection of our own
        self._verified_incoming: dict[str, MaculaProtocol] = {}
        self._trusted: TrustedCA | None = None
        self.handler: RequestHandler | None = None
        self.peer_log = QuietLog(log)  # what peers send wrong: counted always, logged now and then
        self.counters = {
            "requests_sent": 0,
            "requests_served": 0,
            "bad_frames": 0,
            "handshakes": 0,
            "refused_sessions": 0,
            "reused_incoming": 0,
            "refused_connections": 0,  # admission: too many at once, or from one address
            "evicted_connections": 0,  # sessionless ones closed to make room, or past their deadline
            "replaced_sessions": 0,  # a peer's oldest session closed for its newest
            "dropped_partial_frames": 0,
        }
        self.pool = ConnectionPool(
            self._connect,
            max_size=pool_size,
            idle_timeout=idle_timeout,
            keepalive_interval=keepalive_interval,
            ping=self._ping,
            close=self._close_conn,
        )
        self._started = False
        self._closing = False
        self._templates: dict[bool, QuicConfiguration] = {}
        # the deadlines of every request sent on this transport's connections, keyed by
        # (connection serial, request id); connections by serial, for as long as they live
        self.deadlines = DeadlineQueue(self._expire_request, self._request_pending)
        self._by_serial: weakref.WeakValueDictionary[int, MaculaProtocol] = weakref.WeakValueDictionary()
        self._serials = itertools.count()
        if not self.tls.verify:
            log.warning(
                "CERTIFICATE VERIFICATION IS OFF for node %s: peers are not authenticated "
                "(explicit insecure mode; never use outside a throw-away lab)",
                identity.name or identity.node_id.hex()[:12],
            )
        elif self.tls.cert:
            bound = self.tls.bound_node_id()
            if bound is None:
                raise CertificateError(
                    f"{self.tls.cert} binds no node id: issue it with `macula-lab certs issue` "
                    "(certificates now carry the node id they may claim)"
                )
            if bound != identity.node_id:
                raise IdentityMismatch(
                    f"{self.tls.cert} binds node id {bound.hex()[:12]}, not {identity.node_id.hex()[:12]}"
                )

    # ----------------------------------------------------------- lifecycle
    @property
    def endpoint(self) -> str:
        return self.identity.endpoint

    async def start(self, handler: RequestHandler) -> str:
        if self._started:
            return self.endpoint
        self.handler = handler
        if self._listen is not None:
            if not (self.tls.cert and self.tls.key):
                raise ConnectFailed("a listening node needs a certificate and key (see `macula-lab certs`)")
            config = self._config(is_client=False)
            self._server = await serve(
                self._listen.host,
                self._listen.port,
                configuration=config,
                create_protocol=lambda quic, stream_handler=None: self._incoming_protocol(quic),
                retry=self.retry,
            )
            sock = compat.server_transport(self._server).get_extra_info("socket")
            port = sock.getsockname()[1]
            self.identity.endpoint = self._advertise or str(Endpoint("quic", self._public_host(), port))
            self._housekeeper = asyncio.get_running_loop().create_task(self._housekeeping())
        self.pool.start()
        self._started = True
        self._closing = False
        return self.endpoint

    def _public_host(self) -> str:
        host = self._listen.host
        if host in ("0.0.0.0", "::", ""):
            # a wildcard bind: peers elsewhere reach us by host name (give `advertise` to override);
            # a loopback address in the DHT would make every other node dial itself
            return socket.gethostname()
        return host

    async def _stop_housekeeping(self) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            await asyncio.gather(self._housekeeper, return_exceptions=True)
            self._housekeeper = None

    async def close(self) -> None:
        if not self._started:
            return
        self._closing = True
        await self._stop_housekeeping()
        await self.pool.close_all()
        for proto in list(self._incoming):
            proto.abort("node stopping")
        if self._server is not None:
            # give CONNECTION_CLOSE frames a moment to leave before the socket goes
            await asyncio.sleep(0)
            self._server.close()
            self._server = None
        self._incoming.clear()
        self._verified_incoming.clear()
        self._started = False

    async def abort(self) -> None:
        """Crash: drop every connection and the socket without telling any peer."""
        if not self._started:
            return
        self._closing = True
        await self._stop_housekeeping()

        async def crash(proto: MaculaProtocol) -> None:
            proto.crash()

        await self.pool.close_all(closer=crash)
        for proto in list(self._incoming):
            proto.crash()
        if self._server is not None:
            compat.server_transport(self._server).close()  # the socket, without QuicServer.close()'s goodbyes
            self._server = None
        self._incoming.clear()
        self._verified_incoming.clear()
        self._started = False

    # ------------------------------------------------------------- requests
    async def request(
        self, endpoint: str, mtype: MessageType, body: dict[str, Any], *, timeout: float | None = None
    ) -> Frame:
        if not self._started:
            raise NotStarted("transport is not started")
        timeout = self.request_timeout if timeout is None else timeout
        conn = self._open_session(endpoint) or await self.pool.get(endpoint)
        self.counters["requests_sent"] += 1
        try:
            reply = await conn.request(mtype, body, timeout)
        except ConnectionClosed:
            if conn.outgoing:
                self.pool.discard(endpoint, conn)
            else:
                self._drop_verified(conn)
            raise
        return raise_for_error(reply)

    def send_request(
        self,
        endpoint: str,
        mtype: MessageType,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
        notify: Callable[[], None] | None = None,
    ) -> asyncio.Future[Frame] | None:
        """Send over an open session now, without a coroutine; None if there is none.

        The future's result is the reply as received: an ERROR reply is not
        raised (see :func:`~.base.raise_for_error`).
        """
        if not self._started:
            raise NotStarted("transport is not started")
        conn = self._open_session(endpoint)
        if conn is None:
            return None
        self.counters["requests_sent"] += 1
        return conn.send_request(mtype, body, self.request_timeout if timeout is None else timeout, notify)

    def _open_session(self, endpoint: str) -> MaculaProtocol | None:
        """A connection to ``endpoint`` usable now: pooled, or a verified incoming one."""
        conn = self.pool.get_nowait(endpoint)
        if conn is None:
            conn = self._verified_incoming.get(endpoint)
            if conn is None or conn.is_closed:
                return None
            self.counters["reused_incoming"] += 1
        return conn

    async def connect(self, endpoint: str) -> PeerInfo:
        if not self._started:
            raise NotStarted("transport is not started")
        conn = await self.pool.get(endpoint)
        return conn.peer

    async def request_session(
        self, node_id: bytes, mtype: MessageType, body: dict[str, Any], *, timeout: float | None = None
    ) -> Frame:
        # oldest first: a holder of the same client certificate may open short sessions beside
        # the long one that advertised (a diagnose probe), and one closing must not fail the call
        sessions = sorted(
            (p for p in self._incoming if p.peer is not None and p.peer.node_id == node_id and not p.is_closed),
            key=lambda p: p.opened_at,
        )
        error: ConnectionClosed | None = None
        for proto in sessions:
            if proto.is_closed:
                continue
            try:
                reply = await proto.request(mtype, body, self.request_timeout if timeout is None else timeout)
            except ConnectionClosed as exc:
                error = exc
                continue
            return raise_for_error(reply)
        raise error or ConnectionClosed(f"no open session from node {node_id.hex()[:12]}")

    def session(self, endpoint: str) -> PeerInfo | None:
        """The peer behind a pooled connection, if one is open."""
        # exactly the connection a request would use now: a closed incoming one is no session (a
        # caller that believed it was would skip bounding the reconnect to a dead peer)
        conn = self._open_session_peek(endpoint)
        return conn.peer if conn is not None else None

    def _open_session_peek(self, endpoint: str) -> MaculaProtocol | None:
        conn = self.pool.peek(endpoint) or self._verified_incoming.get(endpoint)
        return conn if conn is not None and not conn.is_closed else None

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "pool": self.pool.stats(),
            "incoming_connections": len(self._incoming),
        }

    # ------------------------------------------------------------- plumbing
    def _config(self, *, is_client: bool) -> QuicConfiguration:
        """A fresh configuration from a template built once (certificate files read once)."""
        template = self._templates.get(is_client)
        if template is None:
            template = self._templates[is_client] = self._build_config(is_client=is_client)
        return dataclasses.replace(template)

    def _build_config(self, *, is_client: bool) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            # the pool may keep connections forever (attached clients): cap the QUIC idle timer
            idle_timeout=max(60.0, min(self.pool.idle_timeout, 600.0) + 30.0),
            max_data=16 * 1024 * 1024,
            max_stream_data=max(4 * 1024 * 1024, 2 * self.max_frame_size),
        )
        if self.tls.cert and self.tls.key:
            config.load_cert_chain(self.tls.cert, self.tls.key)
        if is_client:
            if self.tls.verify and not self.tls.ca:
                raise ConnectFailed("certificate verification needs the lab CA (ca=...); or pass insecure explicitly")
            # the server's certificate is checked by _connect() (verify.verify_peer: once per process
            # per certificate) as soon as TLS completes, before anything is sent; aioquic still
            # checks that the server holds the certificate's key (CertificateVerify)
            config.verify_mode = ssl.CERT_NONE
        return config

    # ------------------------------------------------------------ admission
    def admit(self, proto: MaculaProtocol) -> bool:
        """A new incoming connection's first datagram: take it, or refuse it (False).

        When the node holds MAX_INCOMING connections, or MAX_INCOMING_PER_ADDRESS
        from that address, the oldest connection still without a session there
        makes room (a flood of handshakes or silent connections never keeps
        peers that complete their session out); if every one has a session, the
        newcomer is refused.
        """
        address = proto.address
        total = len(self._incoming) - 1  # (proto itself is already in the set)
        here = self._per_address.get(address, 0)
        if total >= MAX_INCOMING or here >= MAX_INCOMING_PER_ADDRESS:
            within = None if total >= MAX_INCOMING else address
            if not self._evict_sessionless(within, newcomer=proto):
                self.counters["refused_connections"] += 1
                self._incoming.discard(proto)
                proto.close(error_code=QuicErrorCode.CONNECTION_REFUSED, reason_phrase="too many connections")
                return False
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return True

    def _evict_sessionless(self, address: str | None, *, newcomer: MaculaProtocol) -> bool:
        """Close the oldest incoming connection without a session (from ``address``, or any)."""
        candidates = [
            p
            for p in self._incoming
            if p is not newcomer and p.peer is None and p.address and (address is None or p.address == address)
        ]
        if not candidates:
            return False
        oldest = min(candidates, key=lambda p: p.opened_at)
        self.counters["evicted_connections"] += 1
        oldest.abort("make room")
        self.forget(oldest)
        return True

    def admit_session(self, proto: MaculaProtocol, peer: PeerInfo) -> None:
        """A peer's CONNECT was accepted: it keeps at most MAX_SESSIONS_PER_PEER sessions (oldest go)."""
        same = sorted(
            (p for p in self._incoming if p is not proto and p.peer is not None and p.peer.node_id == peer.node_id),
            key=lambda p: p.opened_at,
        )
        for old in same[: max(0, len(same) + 1 - MAX_SESSIONS_PER_PEER)]:
            self.counters["replaced_sessions"] += 1
            old.abort("replaced by a newer session of the same peer")
            self.forget(old)

    async def _housekeeping(self) -> None:
        """Close connections past their session deadline; drop frames left unfinished too long."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            now = loop.time()
            for proto in list(self._incoming):
                try:
                    if proto.peer is None and now - proto.opened_at > SESSION_DEADLINE:
                        self.counters["evicted_connections"] += 1
                        proto.abort("no session in time")
                        self.forget(proto)
                        continue
                    for stream_id in proto.overdue_partial(now):
                        self.counters["dropped_partial_frames"] += 1
                        proto.drop_stream(stream_id, f"frame unfinished after {PARTIAL_FRAME_DEADLINE:g}s")
                except Exception:  # one connection's trouble must not end the housekeeping
                    log.exception("housekeeping of a connection failed")

    def _incoming_protocol(self, quic: QuicConnection) -> MaculaProtocol:
        proto = MaculaProtocol(quic, owner=self, outgoing=False)
        self._incoming.add(proto)
        compat.prefer_x25519(quic)
        if self.tls.verify and self.tls.ca:
            compat.request_client_certificate(quic)
        return proto

    def register(self, proto: MaculaProtocol) -> int:
        serial = next(self._serials)
        self._by_serial[serial] = proto
        return serial

    def _expire_request(self, serial: int, rid: bytes) -> None:
        proto = self._by_serial.get(serial)
        if proto is not None:
            proto.expire(rid)

    def _request_pending(self, serial: int, rid: bytes) -> bool:
        proto = self._by_serial.get(serial)
        return proto is not None and rid in proto._pending

    # ------------------------------------------------------------ identity
    def check_claims(self, proto: MaculaProtocol, peer: PeerInfo) -> MaculaError | None:
        """What is wrong with a client's CONNECT claims, judged by its certificate (None: nothing).

        Mutual TLS: the client must present a certificate of the lab CA; the
        node id it claims must be the one its certificate binds, and an
        endpoint it claims must be a host its certificate names (the check a
        dialler makes of a server, applied to where the client says it
        listens).  Off only in explicit insecure mode.
        """
        if not self.tls.verify:
            return None
        cert, chain = compat.peer_certificate(proto._quic)
        if cert is None:
            return Unauthenticated(
                "a session needs a certificate of the lab CA (a node's, or a client's: "
                "`macula-lab certs issue-client NAME`)"
            )
        bound = self._verified_id(cert, chain)
        if isinstance(bound, MaculaError):
            return bound
        if bound != peer.node_id:
            return IdentityMismatch(
                f"CONNECT claims node id {peer.short_id} but the certificate binds {bound.hex()[:12]}"
            )
        if peer.endpoint:
            host = parse_endpoint(peer.endpoint).host
            try:
                verify_peer(cert, chain, ca=self._ca(), server_name=host)
            except Exception:
                return IdentityMismatch(
                    f"{peer.name or peer.short_id} claims endpoint {peer.endpoint}, "
                    f"but its certificate does not name {host}"
                )
        return None

    def _verified_id(self, cert: Any, chain: list[Any]) -> bytes | MaculaError:
        """The node id a certificate of the lab CA binds (chain checked: verify.verify_peer)."""
        try:
            verify_peer(cert, chain, ca=self._ca())
        except Exception as exc:
            return Unauthenticated(f"the client certificate does not verify: {exc}")
        bound = cert_node_id(cert)
        return bound if bound else Unauthenticated("the client certificate binds no node id")

    def _ca(self) -> TrustedCA:
        if self._trusted is None:
            if not self.tls.ca:
                raise Unauthenticated("this node has no lab CA to verify peers with")
            with open(self.tls.ca, "rb") as f:
                self._trusted = TrustedCA(f.read())
        return self._trusted

    def _check_server_certificate(self, proto: MaculaProtocol, host: str) -> None:
        """The server we dialled proves it is ``host`` with a certificate of the lab CA (or CertificateError)."""
        if not self.tls.verify:
            return
        cert, chain = compat.peer_certificate(proto._quic)
        if cert is None:
            raise CertificateError(f"{proto.endpoint} presented no certificate")
        try:
            verify_peer(cert, chain, ca=self._ca(), server_name=host)
        except Exception as exc:
            raise CertificateError(f"TLS handshake with {proto.endpoint} failed: {exc}") from None

    def check_server_claims(self, proto: MaculaProtocol, peer: PeerInfo) -> None:
        """The server's CONNECT_ACK must claim the id its certificate (verified by TLS) binds."""
        if not self.tls.verify:
            return
        cert, _chain = compat.peer_certificate(proto._quic)
        bound = cert_node_id(cert) if cert is not None else None
        if bound != peer.node_id:
            raise IdentityMismatch(
                f"{proto.endpoint} claims node id {peer.short_id} but its certificate binds "
                f"{bound.hex()[:12] if bound else 'none'}"
            )

    def mark_verified(self, proto: MaculaProtocol, peer: PeerInfo) -> None:
        """A session whose client proved it listens at its endpoint: requests to there may reuse it."""
        if not peer.endpoint or not self.tls.verify:
            return
        endpoint = str(parse_endpoint(peer.endpoint))
        old = self._verified_incoming.get(endpoint)
        if old is None or old.is_closed:
            self._verified_incoming[endpoint] = proto
            proto.verified_endpoint = endpoint

    def _drop_verified(self, proto: MaculaProtocol) -> None:
        key = proto.verified_endpoint
        if key and self._verified_incoming.get(key) is proto:
            del self._verified_incoming[key]

    async def _connect(self, endpoint: str) -> MaculaProtocol:
        """Open a QUIC connection and run the session handshake (both bounded in time)."""
        ep = parse_endpoint(endpoint)
        if ep.scheme != "quic":
            raise ConnectFailed(f"QUIC transport cannot reach {endpoint}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        if ep.is_ip:  # no resolver round trip (a thread-pool hop) for IP literals
            addr = (ep.host, ep.port) if ":" not in ep.host else (ep.host, ep.port, 0, 0)
        else:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    infos = await loop.getaddrinfo(ep.host, ep.port, type=socket.SOCK_DGRAM)
            except TimeoutError:
                raise ConnectTimeout(
                    f"resolving {ep.host} took longer than {self.connect_timeout:g}s"
                ) from None
            except OSError as exc:
                raise ConnectFailed(f"cannot resolve {ep.host}: {exc}") from None
            addr = infos[0][4]
        if len(addr) == 2:
            addr = ("::ffff:" + addr[0], addr[1], 0, 0)
        config = self._config(is_client=True)
        config.server_name = ep.host
        quic = QuicConnection(configuration=config)
        compat.prefer_x25519(quic)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0, 0, 0))
            _, proto = await loop.create_datagram_endpoint(
                lambda: MaculaProtocol(quic, owner=self, outgoing=True), sock=sock
            )
        except OSError as exc:
            sock.close()
            raise ConnectFailed(f"cannot open a UDP socket for {endpoint}: {exc}") from None
        proto.endpoint = str(ep)
        try:
            proto.connect(addr, transmit=True)
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await proto.wait_connected()
            except TimeoutError:
                raise ConnectTimeout(
                    f"no QUIC handshake with {endpoint} within {self.connect_timeout:g}s "
                    "(is a node listening there? is UDP reachable?)"
                ) from None
            except ConnectionError:
                raise self.termination_error(proto, proto.terminated) from None
            self.counters["handshakes"] += 1
            self._check_server_certificate(proto, ep.host)
            await proto.handshake(self.identity, max(0.1, deadline - loop.time()))
        except BaseException:
            proto.abort("handshake failed")
            udp = compat.datagram_transport(proto)
            if udp is not None:
                udp.close()
            raise
        log.debug("connected to %s (%s)", endpoint, proto.peer.name if proto.peer else "?")
        return proto

    def termination_error(
        self, proto: MaculaProtocol, event: events.ConnectionTerminated | None
    ) -> MaculaError:
        where = proto.endpoint or "peer"
        if event is None:
            return ConnectionClosed(f"connection to {where} closed")
        code, reason = event.error_code, event.reason_phrase
        if _CRYPTO_ERROR_BASE <= code < _CRYPTO_ERROR_BASE + 0x100:
            return CertificateError(f"TLS handshake with {where} failed: {reason or hex(code)}")
        if code == APP_ERR_REALM:
            return RealmMismatch(f"{where} closed the session: {reason}")
        return ConnectionClosed(f"connection to {where} closed ({reason or hex(code)})")

    def forget(self, proto: MaculaProtocol) -> None:
        """A connection terminated: drop it from wherever we keep it."""
        if proto.outgoing:
            self.pool.discard(proto.endpoint, proto)
            udp = compat.datagram_transport(proto)
            if udp is not None:
                udp.close()
        else:
            if proto in self._incoming:
                self._incoming.discard(proto)
                if proto.address and (n := self._per_address.get(proto.address, 0)) > 0:
                    if n == 1:
                        del self._per_address[proto.address]
                    else:
                        self._per_address[proto.address] = n - 1
            self._drop_verified(proto)
            peer = proto.peer
            if peer is not None and not proto.session_ended and self.on_session_closed is not None:
                proto.session_ended = True
                # the peer is gone only if no other session of it remains (a reconnect replaced this one)
                if not self._closing and not any(
                    p.peer is not None and p.peer.node_id == peer.node_id for p in self._incoming
                ):
                    self.on_session_closed(peer)

    async def _ping(self, proto: MaculaProtocol) -> None:
        await proto.request(MessageType.PING, {"id": new_id()}, timeout=self.request_timeout)

    async def _close_conn(self, proto: MaculaProtocol) -> None:
        proto.abort("idle")
        udp = compat.datagram_transport(proto)
        if udp is not None:
            await asyncio.sleep(0)  # let the CONNECTION_CLOSE datagram go out
            udp.close()
