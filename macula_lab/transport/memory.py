"""In-memory transport: a simulated network for tests and scale studies.

Model
-----
A :class:`MemoryNetwork` is a set of named hosts sharing one asyncio loop.  A
:class:`MemoryTransport` listens at ``mem://<name>`` once started.  Every
message is a real frame: the sender encodes it with :func:`codec.encode`, the
receiver decodes it with a fresh :class:`FrameDecoder` (QUIC carries each
request on its own stream), so serialisation bugs and frame-size limits show up
in memory tests exactly as they would over QUIC.

A message in flight is a single ``loop.call_later`` handle: no task per message
and no background task per node, so thousands of nodes fit in one loop.  The
only tasks are one per request being served (the handler may await) and one per
session handshake in progress.

Link model
----------
* **Latency** is one way: the link's override (:meth:`MemoryNetwork.set_latency`,
  symmetric) or ``default_latency``, plus a uniform ``[0, jitter)`` draw.
* **Loss**: the link's override (:meth:`~MemoryNetwork.set_loss`) or
  ``default_loss``; drawn once per message, when it leaves.
* **Partition**: :meth:`~MemoryNetwork.partition` splits hosts into groups; hosts
  in different groups exchange nothing.  Hosts named in no group form one more
  group together ("the rest"), so ``partition(["a", "b"])`` cuts a and b off from
  everyone else.  A new call replaces the previous partition; :meth:`heal` ends it.
* **Kill**: :meth:`~MemoryNetwork.kill` makes a host a black hole, like a crashed
  machine: it sends and receives nothing, and nobody is told.  The transport
  object keeps running (its own requests time out); :meth:`revive` undoes it.
  Kill and partition are independent of each other (``heal`` revives nobody).

Partitions and kills are checked when a message leaves *and* when it arrives, so
messages in flight when a fault starts are lost too.  All randomness comes from
one ``random.Random(seed)``: the same seed and the same sequence of sends give
the same drops and delays.

Failure semantics (what a QUIC node over UDP could observe)
-----------------------------------------------------------
* An unknown name raises :class:`ConnectFailed` at once: like an address that
  does not resolve, there is nobody to wait for.
* A killed, partitioned or lossy path is silence (UDP gives no RST, and a crashed
  host sends no ICMP): the handshake ends in :class:`ConnectTimeout`, a request
  on an established session in :class:`RequestTimeout`.
* :meth:`MemoryTransport.close` sends a close notice on each of its connections
  (QUIC's CONNECTION_CLOSE).  Notices obey partitions and kills but not random
  loss (a QUIC endpoint answers later packets with another close).  A peer that
  receives one fails the requests pending on that connection with
  :class:`ConnectionClosed` and forgets the session; its next request finds the
  name gone and raises :class:`ConnectFailed`.  If the notice is lost, requests
  time out as with a dead host.
* A request on a connection the receiving host does not know (the name was
  re-registered by a new transport) is answered with a reset (QUIC's stateless
  reset): :class:`ConnectionClosed`, and the next request performs a new handshake.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from ..core import codec
from ..core.codec import DEFAULT_MAX_FRAME_SIZE, FrameDecoder
from ..core.endpoint import parse_endpoint
from ..core.messages import REPLY_TYPES, Frame, MessageType, new_id
from ..core.params import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT
from ..core.session import Identity, PeerInfo, accept_connect, connect_body, peer_from_ack
from ..errors import (
    CodecError,
    ConnectFailed,
    ConnectionClosed,
    ConnectTimeout,
    InvalidEndpoint,
    InvalidField,
    MaculaError,
    MalformedPayload,
    NotStarted,
    RequestTimeout,
)
from .base import (
    QuietLog,
    Reply,
    RequestHandler,
    Transport,
    answer,
    error_for,
    error_reply,
    raise_for_error,
    wall_time,
)

__all__ = ["EndpointInUse", "MemoryNetwork", "MemoryTransport"]

log = logging.getLogger(__name__)


class EndpointInUse(MaculaError, ValueError):
    """Another running transport already listens at this endpoint."""

    code = "endpoint_in_use"


# (dst name, connection, payload) -> True if the destination took the message
_Deliver = Callable[[str, "_Conn", Any], bool]


class _Conn:
    """One session between a client transport and the host it connected to.

    The same object is known to both sides; each side keeps its own view of
    whether it is open (client: in ``_sessions``; server: in ``_accepted``), so a
    lost close notice leaves the two views disagreeing, as on a real network.
    """

    __slots__ = (
        "client",
        "server",
        "server_name",
        "key",
        "peer",
        "client_peer",
        "pending",
        "reverse_pending",
        "abandoned",
    )

    def __init__(self, client: MemoryTransport, server_name: str, key: str):
        self.client = client
        self.server: MemoryTransport | None = None  # set by the host that accepts it
        self.server_name = server_name
        self.key = key  # normalised endpoint, the client's session-cache key
        self.peer: PeerInfo | None = None  # the server, as its CONNECT_ACK describes it
        self.client_peer: PeerInfo | None = None  # the client, as its CONNECT describes it
        self.pending: dict[bytes, _Waiting] = {}  # the client's requests, by id
        self.reverse_pending: dict[bytes, _Waiting] = {}  # the server's requests to the client, by id
        self.abandoned = False  # the client gave up on it (closed, or handshake failed)


class MemoryNetwork:
    """Named hosts, the links between them, and the faults on those links."""

    def __init__(
        self,
        *,
        seed: int | None = 0,
        default_latency: float = 0.0,
        jitter: float = 0.0,
        default_loss: float = 0.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ):
        _check_latency(default_latency)
        _check_latency(jitter)
        _check_loss(default_loss)
        self.seed = seed
        self.default_latency = default_latency
        self.jitter = jitter
        self.default_loss = default_loss
        self.max_frame_size = max_frame_size
        self._rng = random.Random(seed)
        self._nodes: dict[str, MemoryTransport] = {}
        self._latency: dict[tuple[str, str], float] = {}
        self._loss: dict[tuple[str, str], float] = {}
        self._group: dict[str, int] = {}  # empty: no partition; unnamed hosts are group 0
        self._dead: set[str] = set()
        self.sent = 0
        self.delivered = 0
        self.bytes_sent = 0
        self.in_flight = 0
        self._dropped = {"loss": 0, "partition": 0, "unreachable": 0}
        #: called with (src, dst, frame bytes) for every frame delivered: a simulation's trace
        self.on_deliver: Callable[[str, str, bytes], None] | None = None

    # ------------------------------------------------------------- hosts
    def __contains__(self, node: object) -> bool:
        return isinstance(node, str | MemoryTransport) and _name_of(node) in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, node: str) -> MemoryTransport | None:
        """The running transport registered under this name or endpoint, if any."""
        return self._nodes.get(_name_of(node))

    def names(self) -> list[str]:
        return list(self._nodes)

    async def close(self) -> None:
        """Close every registered transport."""
        for transport in list(self._nodes.values()):
            await transport.close()

    def _register(self, transport: MemoryTransport) -> None:
        other = self._nodes.get(transport.name)
        if other is not None and other is not transport:
            raise EndpointInUse(
                f"{transport.endpoint} is already used by a running transport on this network"
            )
        self._nodes[transport.name] = transport

    def _unregister(self, transport: MemoryTransport) -> None:
        if self._nodes.get(transport.name) is transport:
            del self._nodes[transport.name]

    # ------------------------------------------------------------- links
    def set_latency(self, a: str | MemoryTransport, b: str | MemoryTransport, seconds: float | None) -> None:
        """One-way latency between a and b, both directions; ``None`` restores the default."""
        key = _link(_name_of(a), _name_of(b))
        if seconds is None:
            self._latency.pop(key, None)
        else:
            _check_latency(seconds)
            self._latency[key] = seconds

    def set_loss(self, a: str | MemoryTransport, b: str | MemoryTransport, probability: float | None) -> None:
        """Loss probability between a and b, both directions; ``None`` restores the default."""
        key = _link(_name_of(a), _name_of(b))
        if probability is None:
            self._loss.pop(key, None)
        else:
            _check_loss(probability)
            self._loss[key] = probability

    def latency(self, a: str | MemoryTransport, b: str | MemoryTransport) -> float:
        """The link's base one-way latency (without jitter)."""
        return self._latency.get(_link(_name_of(a), _name_of(b)), self.default_latency)

    def loss(self, a: str | MemoryTransport, b: str | MemoryTransport) -> float:
        return self._loss.get(_link(_name_of(a), _name_of(b)), self.default_loss)

    # ------------------------------------------------------------ faults
    def partition(self, *groups: Iterable[str | MemoryTransport] | str | MemoryTransport) -> None:
        """Split the network: hosts in different groups cannot exchange messages.

        Each group is a list of names, endpoints or transports (a single one
        is a group of one).  Hosts named in no group, including hosts started
        later, form one more group together.  Replaces any previous partition.
        """
        group: dict[str, int] = {}
        for number, members in enumerate(groups, start=1):
            if isinstance(members, str | MemoryTransport):
                members = [members]
            for member in members:
                name = _name_of(member)
                if group.get(name, number) != number:
                    raise ValueError(f"{name!r} is in two partition groups")
                group[name] = number
        self._group = group

    def heal(self) -> None:
        """End the partition (killed hosts stay dead; see :meth:`revive`)."""
        self._group = {}

    def kill(self, node: str | MemoryTransport) -> None:
        """Make a host silently unreachable, like a crashed machine."""
        self._dead.add(_name_of(node))

    def revive(self, node: str | MemoryTransport) -> None:
        self._dead.discard(_name_of(node))

    def alive(self, node: str | MemoryTransport) -> bool:
        return _name_of(node) not in self._dead

    def can_reach(self, a: str | MemoryTransport, b: str | MemoryTransport) -> bool:
        """Whether a message from a to b could get through (ignoring random loss)."""
        return self._blocked(_name_of(a), _name_of(b)) is None

    # ----------------------------------------------------------- counters
    @property
    def dropped(self) -> int:
        return sum(self._dropped.values())

    def stats(self) -> dict[str, int]:
        """Frame counters (close notices are not frames and are not counted)."""
        return {
            "nodes": len(self._nodes),
            "dead": len(self._dead),
            "sent": self.sent,
            "delivered": self.delivered,
            "dropped": self.dropped,
            **{f"dropped_{why}": n for why, n in self._dropped.items()},
            "in_flight": self.in_flight,
            "bytes_sent": self.bytes_sent,
        }

    def __repr__(self) -> str:
        return (
            f"<MemoryNetwork nodes={len(self._nodes)} dead={len(self._dead)} "
            f"partitioned={bool(self._group)} sent={self.sent} dropped={self.dropped}>"
        )

    # ---------------------------------------------------------- delivery
    def _blocked(self, src: str, dst: str) -> str | None:
        if src in self._dead or dst in self._dead:
            return "unreachable"
        if self._group and self._group.get(src, 0) != self._group.get(dst, 0):
            return "partition"
        return None

    def _send_frame(self, src: str, dst: str, deliver: _Deliver, conn: _Conn, data: bytes) -> None:
        self.sent += 1
        self.bytes_sent += len(data)
        why = self._blocked(src, dst)
        if why is None and (self._loss or self.default_loss):
            loss = self._loss.get(_link(src, dst), self.default_loss) if self._loss else self.default_loss
            if loss and self._rng.random() < loss:
                why = "loss"
        if why is not None:
            self._dropped[why] += 1
            return
        self.in_flight += 1
        self._schedule(src, dst, self._arrive_frame, deliver, conn, data)

    def _arrive_frame(self, src: str, dst: str, deliver: _Deliver, conn: _Conn, data: bytes) -> None:
        self.in_flight -= 1
        why = self._blocked(src, dst)
        if why is None and not deliver(dst, conn, data):
            why = "unreachable"  # nobody listening there any more
        if why is None:
            self.delivered += 1
            if self.on_deliver is not None:
                self.on_deliver(src, dst, data)
        else:
            self._dropped[why] += 1

    def _send_notice(self, src: str, dst: str, deliver: _Deliver, conn: _Conn, reason: str) -> None:
        if self._blocked(src, dst) is None:
            self._schedule(src, dst, self._arrive_notice, deliver, conn, reason)

    def _arrive_notice(self, src: str, dst: str, deliver: _Deliver, conn: _Conn, reason: str) -> None:
        if self._blocked(src, dst) is None:
            deliver(dst, conn, reason)

    def _schedule(self, src: str, dst: str, arrive: Callable[..., None], *args: Any) -> None:
        delay = (
            self._latency.get(_link(src, dst), self.default_latency)
            if self._latency
            else self.default_latency
        )
        if self.jitter:
            delay += self._rng.random() * self.jitter
        loop = asyncio.get_running_loop()
        # one timer handle per message in flight; call_soon keeps zero latency FIFO
        if delay > 0:
            loop.call_later(delay, arrive, src, dst, *args)
        else:
            loop.call_soon(arrive, src, dst, *args)

    def _to_host(self, dst: str, conn: _Conn, data: bytes) -> bool:
        host = self._nodes.get(dst)  # whoever listens at that name *now*
        return host is not None and host._from_client(conn, data)


class MemoryTransport(Transport):
    """A node's transport on a :class:`MemoryNetwork`, listening at ``mem://<name>``.

    ``listen=False`` makes a pure client (an attached client's transport):
    nobody can dial it, its CONNECT carries no endpoint, but the node it
    connects to can send requests back over that session (:meth:`request_session`).
    Without :meth:`start` it can still send requests, but answers none.
    """

    def __init__(
        self,
        network: MemoryNetwork,
        identity: Identity,
        name: str | None = None,
        *,
        listen: bool = True,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_frame_size: int | None = None,
    ):
        name = name or identity.name
        if not name:
            raise InvalidEndpoint("a memory transport needs a name (pass name= or set identity.name)")
        if parse_endpoint(f"mem://{name}").host != name:
            raise InvalidEndpoint(f"{name!r} cannot be used as a memory endpoint name")
        self.network = network
        self.identity = identity
        self.name = name
        self.listen = listen
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        # None: the network's limit.  Frames are encoded with the sender's limit and
        # decoded with the receiver's; a frame over the receiver's limit loses its
        # framing and is dropped (logged), so the requester times out.
        self._max_frame_size = max_frame_size
        self._endpoint = f"mem://{name}"
        self._handler: RequestHandler | None = None
        self._started = False
        self._closed = False
        self._sessions: dict[str, _Conn] = {}  # normalised endpoint -> established session
        self._connecting: dict[str, tuple[_Conn, asyncio.Task[_Conn]]] = {}
        self._accepted: dict[_Conn, None] = {}  # incoming sessions (a dict: ordered, for determinism)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.peer_log = QuietLog(log)  # what peers send wrong: logged now and then
        self._n = {"requests_sent": 0, "request_errors": 0, "served": 0, "served_errors": 0, "handshakes": 0}

    # --------------------------------------------------------- interface
    @property
    def endpoint(self) -> str:
        return self._endpoint if self.listen else ""

    @property
    def max_frame_size(self) -> int:
        return self._max_frame_size or self.network.max_frame_size

    @property
    def started(self) -> bool:
        return self._started and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    async def start(self, handler: RequestHandler) -> str:
        """Register on the network (unless ``listen=False``) and serve requests with ``handler``.

        Idempotent: later calls return the endpoint and change nothing.
        Raises :class:`EndpointInUse` if another running transport has the name.
        """
        if self._closed:
            raise NotStarted(f"{self._endpoint} is closed; create a new MemoryTransport")
        if not self._started:
            if self.listen:
                self.network._register(self)
                self.identity.endpoint = self._endpoint
            self._handler = handler
            self._started = True
        return self.endpoint

    async def request(
        self,
        endpoint: str,
        mtype: MessageType,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the Transport interface's signature
    ) -> Frame:
        """Send one request (adding an ``id`` if the body has none) and return the reply.

        The first request to an endpoint performs the session handshake, bounded
        by ``connect_timeout``; the request itself is bounded by ``timeout``.
        """
        if self._closed:
            raise NotStarted(f"{self._endpoint} is closed")
        if mtype is MessageType.CONNECT:
            raise InvalidField("CONNECT is sent by the transport itself, not through request()")
        self._n["requests_sent"] += 1
        try:
            conn = self._sessions.get(endpoint) or await self._session(endpoint)
            if "id" not in body:
                body = {**body, "id": new_id()}
            timeout = self.request_timeout if timeout is None else timeout
            return raise_for_error(await self._exchange(conn, mtype, body, timeout, RequestTimeout))
        except MaculaError:
            self._n["request_errors"] += 1
            raise

    def send_request(
        self,
        endpoint: str,
        mtype: MessageType,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
        notify: Callable[[], None] | None = None,
    ) -> asyncio.Future[Frame] | None:
        """Send over an established session now; the future gets the raw reply (None: no session)."""
        if self._closed:
            raise NotStarted(f"{self._endpoint} is closed")
        conn = self._sessions.get(endpoint)
        if conn is None:
            return None
        if "id" not in body:
            body["id"] = new_id()
        self._n["requests_sent"] += 1
        limit = self.request_timeout if timeout is None else timeout
        return self._send(conn, mtype, body, limit, RequestTimeout, notify=notify)

    async def request_session(
        self, node_id: bytes, mtype: MessageType, body: dict[str, Any], *, timeout: float | None = None
    ) -> Frame:
        """Send a request back over the session that peer ``node_id`` opened to us."""
        for conn in self._accepted:
            if conn.client_peer is not None and conn.client_peer.node_id == node_id:
                if "id" not in body:
                    body = {**body, "id": new_id()}
                limit = self.request_timeout if timeout is None else timeout
                fut = self._send(conn, mtype, body, limit, RequestTimeout, reverse=True)
                return raise_for_error(await _awaited(fut, conn.reverse_pending, body["id"]))
        raise ConnectionClosed(f"no open session from node {node_id.hex()[:12]}")

    async def connect(self, endpoint: str) -> PeerInfo:
        """Establish (or reuse) the session with ``endpoint``; returns who answered."""
        if self._closed:
            raise NotStarted(f"{self._endpoint} is closed")
        conn = self._sessions.get(endpoint) or await self._session(endpoint)
        assert conn.peer is not None
        return conn.peer

    def session(self, endpoint: str) -> PeerInfo | None:
        """The peer of an established session, or None."""
        conn = self._sessions.get(endpoint)
        if conn is None:
            try:
                conn = self._sessions.get(str(parse_endpoint(endpoint)))
            except InvalidEndpoint:
                return None
        return conn.peer if conn is not None else None

    async def abort(self) -> None:
        """Crash: vanish without a word.  Peers see silence and time out, as with a dead host."""
        if self._started:
            self.network.kill(self)  # the close notices below are dropped: nobody is told
        await self.close()

    async def close(self) -> None:
        """Unregister, tell peers, fail our pending requests, cancel and await our tasks."""
        if self._closed:
            return
        self._closed = True
        net = self.network
        net._unregister(self)
        outgoing = [*self._sessions.values(), *(conn for conn, _ in self._connecting.values())]
        for conn in outgoing:
            _fail(conn.pending, f"{self._endpoint} was closed")
            conn.abandoned = True
            net._send_notice(self.name, conn.server_name, _notice_to_server, conn, "closed")
        for conn in self._accepted:
            _fail(conn.reverse_pending, f"{self._endpoint} was closed")
            net._send_notice(self.name, conn.client.name, _notice_to_client, conn, "closed")
        self._sessions.clear()
        self._accepted.clear()
        # Handshake tasks end on their own now that their futures have failed
        # (cancelling them would turn waiters' ConnectionClosed into CancelledError).
        handshakes = {task for _, task in self._connecting.values()}
        current = asyncio.current_task()  # close() may be called from one of our handlers
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            if task not in handshakes:
                task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        pending = sum(len(c.pending) for c in self._sessions.values())
        pending += sum(len(c.pending) for c, _ in self._connecting.values())
        return {
            "endpoint": self.endpoint,
            "started": self.started,
            "closed": self._closed,
            **self._n,
            "sessions": len(self._sessions),
            "accepted": len(self._accepted),
            "pending": pending,
            "tasks": len(self._tasks),
        }

    def __repr__(self) -> str:
        state = "closed" if self._closed else "started" if self._started else "new"
        return f"<MemoryTransport {self._endpoint} {state} sessions={len(self._sessions)}>"

    # ------------------------------------------------------- client side
    async def _session(self, endpoint: str) -> _Conn:
        ep = parse_endpoint(endpoint)
        key = str(ep)
        conn = self._sessions.get(key)
        if conn is not None:
            return conn
        connecting = self._connecting.get(key)
        if connecting is None:
            if ep.scheme != "mem":
                raise ConnectFailed(
                    f"{key} is not reachable from the in-memory network {self._endpoint} is on"
                )
            if ep.host not in self.network._nodes and self.network.alive(ep.host):
                # a crashed (killed) host stays silent: the handshake times out instead
                raise ConnectFailed(f"no node listens at {key} on this network")
            conn = _Conn(self, ep.host, key)
            connecting = (conn, self._spawn(self._handshake(conn)))
            self._connecting[key] = connecting
        # shield: a waiter that gives up must not cancel the handshake others share
        return await asyncio.shield(connecting[1])

    async def _handshake(self, conn: _Conn) -> _Conn:
        self._n["handshakes"] += 1
        try:
            frame = await self._exchange(
                conn, MessageType.CONNECT, connect_body(self.identity), self.connect_timeout, ConnectTimeout
            )
            conn.peer = peer_from_ack(self.identity, frame, conn.key)
            if self._closed:  # closed while the ACK was on its way
                raise ConnectionClosed(f"{self._endpoint} was closed")
        except BaseException:
            # the server may have accepted (and only its ACK was lost): let it forget us
            conn.abandoned = True
            self.network._send_notice(
                self.name, conn.server_name, _notice_to_server, conn, "handshake failed"
            )
            raise
        finally:
            self._connecting.pop(conn.key, None)
        self._sessions[conn.key] = conn
        return conn

    async def _exchange(
        self,
        conn: _Conn,
        mtype: MessageType,
        body: dict[str, Any],
        limit: float,
        timeout_error: type[MaculaError],
    ) -> Frame:
        """Send one frame on ``conn`` and wait for the frame answering its id."""
        return await _awaited(self._send(conn, mtype, body, limit, timeout_error), conn.pending, body["id"])

    def _send(
        self,
        conn: _Conn,
        mtype: MessageType,
        body: dict[str, Any],
        limit: float,
        timeout_error: type[MaculaError],
        *,
        notify: Callable[[], None] | None = None,
        reverse: bool = False,
    ) -> asyncio.Future[Frame]:
        """Send a request on ``conn`` (server to client with ``reverse``); the future gets its reply."""
        if self._closed:
            raise ConnectionClosed(f"{self._endpoint} was closed")
        data = codec.encode(mtype, body, max_frame_size=self.max_frame_size)
        rid = body["id"]
        pending = conn.reverse_pending if reverse else conn.pending
        if rid in pending:
            raise InvalidField(f"request id {rid.hex()} is already waiting for a reply")
        loop = asyncio.get_running_loop()
        waiting = _Waiting(loop.create_future(), notify)
        pending[rid] = waiting
        # a timer handle, not a wait_for task wrapper: cheap, and the error is ours
        waiting.timer = loop.call_later(limit, _expire, pending, rid, timeout_error, conn.key, mtype, limit)
        if reverse:
            self.network._send_frame(self.name, conn.client.name, _to_client, conn, data)
        else:
            self.network._send_frame(self.name, conn.server_name, self.network._to_host, conn, data)
        return waiting.fut

    def _from_server(self, conn: _Conn, data: bytes) -> bool:
        """A frame from the node we connected to: a reply to us, or a request of its own."""
        if self._closed:
            return False
        item = _decode(data, self.max_frame_size)
        if isinstance(item, Frame) and item.type not in REPLY_TYPES:
            if self._sessions.get(conn.key) is not conn:
                return True  # a session we no longer hold: the server's request times out
            self._answer(conn, item, conn.peer, reverse=False)
            return True
        _settle_reply(conn.pending, item, f"{self._endpoint}: undecodable reply from {conn.key} dropped")
        return True

    def _on_closed_by_peer(self, conn: _Conn, reason: str) -> None:
        if self._closed:
            return
        if self._sessions.get(conn.key) is conn:
            del self._sessions[conn.key]
        _fail(conn.pending, f"{conn.key} closed the connection ({reason})")

    # ------------------------------------------------------- server side
    def _from_client(self, conn: _Conn, data: bytes) -> bool:
        """A frame from a client: CONNECT, a request, or a reply to our :meth:`request_session`."""
        if self._closed:
            return False
        item = _decode(data, self.max_frame_size)
        ours = conn.server is self and conn in self._accepted
        if isinstance(item, CodecError):
            rid = getattr(item, "request_id", None)
            if rid is None:  # nothing to answer to; the requester will time out
                self.peer_log.warning(
                    "%s: undecodable frame from %s dropped: %s", self._endpoint, conn.client.name, item
                )
            elif not (ours and _settle_reply(conn.reverse_pending, item, "")):
                mtype, body = error_for(item)
                body["id"] = rid
                self._reply(conn, mtype, body, reverse=True)
            return True
        if item.type is MessageType.CONNECT:
            # A CONNECT that lands after its client gave up (overtaken by the close
            # notice under jitter) is ignored, as QUIC would idle-time it out.
            if not conn.abandoned:
                self._accept(conn, item)
        elif not ours:
            # not our session (we are a new transport under an old name): reset it
            self.network._send_notice(self.name, conn.client.name, _notice_to_client, conn, "reset")
        elif item.type in REPLY_TYPES:
            _settle_reply(conn.reverse_pending, item, "")
        else:
            self._answer(conn, item, conn.client_peer, reverse=True)
        return True

    def _accept(self, conn: _Conn, frame: Frame) -> None:
        try:
            peer, mtype, body = accept_connect(self.identity, frame, now=wall_time())
        except MaculaError as exc:  # e.g. an unsupported protocol version
            mtype, body = error_for(exc)
            body["id"] = frame.id
        else:
            if mtype is MessageType.CONNECT_ACK:
                conn.client_peer = peer
                conn.server = self
                self._accepted[conn] = None
        self._reply(conn, mtype, body, reverse=True)

    def _answer(self, conn: _Conn, frame: Frame, peer: PeerInfo | None, *, reverse: bool) -> None:
        """Serve one request; ``reverse``: the reply goes back to the client (we are its server)."""
        if self._handler is None or peer is None:
            mtype, body = error_reply("not_serving", f"{self._endpoint} serves no requests")
            body["id"] = frame.id
            self._reply(conn, mtype, body, reverse=reverse)
            return
        result = answer(self._handler, frame, peer)
        if isinstance(result, tuple):  # answered at once, as QUIC does: no task
            self._n["served"] += 1
            self._reply(conn, *result, reverse=reverse)
        else:
            self._spawn(self._serve(conn, result, reverse))

    async def _serve(self, conn: _Conn, pending: Awaitable[Reply], reverse: bool) -> None:
        mtype, body = await pending
        self._n["served"] += 1
        self._reply(conn, mtype, body, reverse=reverse)

    def _reply(self, conn: _Conn, mtype: MessageType, body: dict[str, Any], *, reverse: bool) -> None:
        """Send a reply: to the client (``reverse``, we serve its session) or to the server."""
        if self._closed:  # a handler that outlived close() (it called close() itself)
            return
        peer_name = conn.client.name if reverse else conn.server_name
        try:
            data = codec.encode(mtype, body, max_frame_size=self.max_frame_size)
        except CodecError as exc:  # the handler built a bad reply: answer with what went wrong
            log.warning("%s: %s reply to %s cannot be encoded: %s", self._endpoint, mtype.name, peer_name, exc)
            mtype, error = error_reply(exc.code, f"{mtype.name} reply could not be encoded: {exc}")
            error["id"] = body["id"]
            data = codec.encode(mtype, error, max_frame_size=self.max_frame_size)
        if mtype is MessageType.ERROR:
            self._n["served_errors"] += 1
        deliver = _to_client if reverse else self.network._to_host
        self.network._send_frame(self.name, peer_name, deliver, conn, data)

    # ------------------------------------------------------------- tasks
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # also marks it retrieved (handshake errors reach waiters via shield)
        if exc is not None and not isinstance(exc, MaculaError):
            log.error("%s: task %s failed", self._endpoint, task.get_name(), exc_info=exc)


# ------------------------------------------------------------------ helpers
class _Waiting:
    """A request in flight: its reply future, its deadline timer, and who to tell when it ends."""

    __slots__ = ("fut", "notify", "timer")

    def __init__(self, fut: asyncio.Future[Frame], notify: Callable[[], None] | None):
        self.fut = fut
        self.notify = notify
        self.timer: asyncio.TimerHandle | None = None

    def settle(self, result: Frame | None = None, exc: BaseException | None = None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.fut.done():  # the requester gave up (cancelled)
            return
        if exc is None:
            self.fut.set_result(result)
        else:
            self.fut.set_exception(exc)
        if self.notify is not None:  # synchronously, as the QUIC transport does
            self.notify()


async def _awaited(fut: asyncio.Future[Frame], pending: dict[bytes, _Waiting], rid: bytes) -> Frame:
    """Await a reply future; a requester that gives up (cancelled) forgets its request at once."""
    try:
        return await fut
    finally:
        waiting = pending.get(rid)
        if waiting is not None and waiting.fut is fut:
            del pending[rid]
            if waiting.timer is not None:
                waiting.timer.cancel()


def _settle_reply(pending: dict[bytes, _Waiting], item: Frame | CodecError, undecodable: str) -> bool:
    """Hand a reply (or an undecodable one) to the request waiting for it; False if none waits."""
    rid = getattr(item, "request_id", None) if isinstance(item, CodecError) else item.id
    waiting = pending.pop(rid, None) if rid is not None else None
    if waiting is None:  # late (timed out), unknown id, or undecodable without an id
        if isinstance(item, CodecError) and undecodable:
            log.warning("%s: %s", undecodable, item)
        return False
    if isinstance(item, CodecError):
        waiting.settle(exc=item)  # a serialisation bug in the peer's reply
    else:
        waiting.settle(item)
    return True


def _to_client(dst: str, conn: _Conn, data: bytes) -> bool:
    return conn.client._from_server(conn, data)


def _notice_to_client(dst: str, conn: _Conn, reason: str) -> bool:
    conn.client._on_closed_by_peer(conn, reason)
    return True


def _notice_to_server(dst: str, conn: _Conn, reason: str) -> bool:
    server = conn.server
    if server is not None and conn in server._accepted:
        del server._accepted[conn]
        _fail(conn.reverse_pending, f"{conn.client.name} closed the connection ({reason})")
        if server.on_session_closed is not None and conn.client_peer is not None and not server._closed:
            server.on_session_closed(conn.client_peer)
    return True


def _fail(pending: dict[bytes, _Waiting], message: str) -> None:
    waiting = list(pending.values())
    pending.clear()
    for w in waiting:
        w.settle(exc=ConnectionClosed(message))


def _expire(
    pending: dict[bytes, _Waiting],
    rid: bytes,
    error: type[MaculaError],
    key: str,
    mtype: MessageType,
    timeout: float,
) -> None:
    waiting = pending.pop(rid, None)
    if waiting is not None:
        waiting.settle(exc=error(f"{key} did not answer {mtype.name} within {timeout:g} s"))


def _decode(data: bytes, max_frame_size: int) -> Frame | CodecError:
    """Decode one whole message with a fresh stream decoder; errors are returned."""
    decoder = FrameDecoder(max_frame_size=max_frame_size)
    try:
        items = decoder.feed(data)
        decoder.finish()
    except CodecError as exc:  # framing lost (version, size): no request id to answer
        return exc
    if len(items) != 1:
        return MalformedPayload(f"expected one frame per message, got {len(items)}")
    return items[0]


def _name_of(node: str | MemoryTransport) -> str:
    if isinstance(node, MemoryTransport):
        return node.name
    if isinstance(node, str):
        if "://" not in node:
            return node
        ep = parse_endpoint(node)
        if ep.scheme != "mem":
            raise InvalidEndpoint(f"{node!r} is not a memory endpoint (mem://name)")
        return ep.host
    raise TypeError(f"expected a node name, mem:// endpoint or MemoryTransport, got {type(node).__name__}")


def _link(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def _check_latency(seconds: float) -> None:
    if not seconds >= 0:  # also rejects NaN
        raise ValueError(f"latency must be >= 0 seconds, got {seconds!r}")


def _check_loss(probability: float) -> None:
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"loss must be a probability in [0, 1], got {probability!r}")
