"""A hostile peer for tests: a bare aioquic client that sends whatever bytes it likes.

It speaks QUIC with the lab CA (so it gets past TLS as any client would) but
builds its frames by hand, so it can send what our own codec refuses to encode:
bad values, wrong types, garbage, frames split or never finished.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from macula_lab.core.codec import HEADER, FrameDecoder
from macula_lab.core.endpoint import parse_endpoint
from macula_lab.core.messages import MessageType, new_id


class RawClient(QuicConnectionProtocol):
    """A bare aioquic client that sends whatever bytes we like on a stream."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.replies: dict[int, bytearray] = {}
        self.ended: dict[int, asyncio.Event] = {}
        self.node_id = b"\7" * 32  # the id its certificate binds (set by raw_connect)

    def connect_frame(self, realm: str, **claims: Any) -> bytes:
        """A CONNECT claiming this client's own id (and whatever ``claims`` add or override)."""
        return connect_frame(realm, **{"node_id": self.node_id, **claims})

    def quic_event_received(self, event):
        if isinstance(event, events.StreamDataReceived):
            self.replies.setdefault(event.stream_id, bytearray()).extend(event.data)
            if event.end_stream:
                self.ended.setdefault(event.stream_id, asyncio.Event()).set()
        elif isinstance(event, events.StreamReset | events.ConnectionTerminated):
            for ev in self.ended.values():
                ev.set()

    async def exchange(self, data: bytes, *, end: bool = True, wait: float = 2.0) -> list:
        """Send ``data`` on a new stream; the frames answered on it (within ``wait`` seconds)."""
        sid = self._quic.get_next_available_stream_id()
        ev = self.ended.setdefault(sid, asyncio.Event())
        self._quic.send_stream_data(sid, data, end_stream=end)
        self.transmit()
        try:
            await asyncio.wait_for(ev.wait(), wait)
        except TimeoutError:
            pass
        dec = FrameDecoder()
        return dec.feed(bytes(self.replies.get(sid, b"")))


async def raw_connect(endpoint: str, certs, *, cert: str | None = "raw") -> RawClient:
    """A QUIC connection to ``endpoint`` verified with the lab CA, presenting ``certs[cert]`` (None: no certificate).

    ``raw.node_id`` is the id that certificate binds (what a CONNECT must claim).
    """
    ep = parse_endpoint(endpoint)
    config = QuicConfiguration(is_client=True, alpn_protocols=["macula"], server_name=ep.host)
    config.load_verify_locations(cafile=str(certs["raw"].ca))
    if cert is not None:
        config.load_cert_chain(str(certs[cert].cert), str(certs[cert].key))
    loop = asyncio.get_running_loop()
    quic = QuicConnection(configuration=config)
    _, proto = await loop.create_datagram_endpoint(lambda: RawClient(quic), remote_addr=(ep.host, ep.port))
    proto.node_id = certs[cert].node_id if cert is not None else b"\7" * 32
    proto.connect((ep.host, ep.port))
    await asyncio.wait_for(proto.wait_connected(), 5)
    return proto


def raw_frame(mtype: MessageType | int, body: Any) -> bytes:
    """A frame built by hand: no schema, no value rules (what a hostile peer can send)."""
    payload = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(1, int(mtype), 0, 0, len(payload)) + payload


def connect_frame(realm: str, **extra: Any) -> bytes:
    """A CONNECT (hand-built: ``extra`` may claim anything, valid or not)."""
    body = {"id": new_id(), "version": 1, "node_id": b"\7" * 32, "realm": realm, "capabilities": [], **extra}
    return raw_frame(MessageType.CONNECT, body)
