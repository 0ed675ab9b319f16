"""Hostile peers against QUIC and HTTP resources: address validation, admission, deadlines, bounded buffers."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from macula_lab.core.codec import HEADER
from macula_lab.core.endpoint import parse_endpoint
from macula_lab.core.messages import MessageType, new_id
from macula_lab.transport import quic

from ..rawpeer import raw_connect, raw_frame
from ..timing import eventually
from ..widgets.test_base import until
from .test_fields import REALM, ask, session


def initial_packets(endpoint: str, n: int) -> tuple[socket.socket, list[bytes]]:
    """``n`` first flights of QUIC handshakes (Initial packets) that will never be continued."""
    ep = parse_endpoint(endpoint)
    out = []
    for _ in range(n):
        config = QuicConfiguration(is_client=True, alpn_protocols=["macula"], server_name=ep.host)
        conn = QuicConnection(configuration=config)
        conn.connect((ep.host, ep.port), now=0.0)
        out += [data for data, _addr in conn.datagrams_to_send(now=0.0)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock, out


async def test_half_open_handshakes_cost_no_state_thanks_to_retry(nodes):
    """Once, 1,000 half-open handshakes held ~40 KiB and ~4 ms of CPU each for the idle timeout."""
    victim = await nodes("node-1", realm=REALM)
    ep = parse_endpoint(victim.endpoint)
    sock, packets = initial_packets(victim.endpoint, 1000)
    try:
        for data in packets:
            sock.sendto(data, (ep.host, ep.port))
        answers = 0

        def drain() -> int:
            nonlocal answers
            while True:
                try:
                    sock.recv(2048)
                    answers += 1
                except BlockingIOError:
                    return answers

        await eventually(drain, 10, "a Retry packet")
    finally:
        sock.close()
    assert answers > 0  # Retry packets: the node answered statelessly
    assert victim.transport.stats()["incoming_connections"] == 0
    other = await nodes("node-2", realm=REALM)
    assert await other.ping(victim.endpoint) > 0  # a real handshake still goes through


async def test_connections_without_a_session_are_closed_at_the_deadline(nodes, certs, monkeypatch):
    monkeypatch.setattr(quic, "SESSION_DEADLINE", 0.5)
    victim = await nodes("node-1", realm=REALM)
    silent = [await raw_connect(victim.endpoint, certs) for _ in range(5)]  # TLS done, no CONNECT
    try:
        assert victim.transport.stats()["incoming_connections"] == 5
        await until(lambda: victim.transport.stats()["incoming_connections"] == 0, 10, "silent connections closed")
        assert victim.transport.counters["evicted_connections"] >= 5
    finally:
        for raw in silent:
            raw.close()


async def test_a_flood_of_connections_from_one_address_makes_room_for_real_sessions(nodes, certs, monkeypatch):
    monkeypatch.setattr(quic, "MAX_INCOMING_PER_ADDRESS", 4)
    victim = await nodes("node-1", realm=REALM)
    silent = [await raw_connect(victim.endpoint, certs) for _ in range(4)]
    try:
        peer = await nodes("node-2", realm=REALM)  # the same address (loopback)
        assert await peer.ping(victim.endpoint) > 0  # the oldest silent connection made room
        assert victim.transport.counters["evicted_connections"] >= 1
        # when every connection has a session, a newcomer is refused instead
        holders = [await session(victim, certs, name=f"raw{i}") for i in range(3)]  # evicting the rest
        extra = await raw_connect(victim.endpoint, certs)
        await until(lambda: victim.transport.counters["refused_connections"] >= 1, 5, "a refusal")
        for raw in [*holders, extra]:
            raw.close()
    finally:
        for raw in silent:
            raw.close()


async def test_one_identity_holds_a_bounded_number_of_sessions_and_one_per_connection(nodes, certs):
    victim = await nodes("node-1", realm=REALM)
    raws = [await session(victim, certs, name="same") for _ in range(quic.MAX_SESSIONS_PER_PEER + 2)]
    try:
        with_session = [p for p in victim.transport._incoming if p.peer is not None]
        assert len(with_session) == quic.MAX_SESSIONS_PER_PEER
        assert victim.transport.counters["replaced_sessions"] == 2
        # a second CONNECT on a connection that has a session is refused; its identity stays
        [err] = await raws[-1].exchange(raws[-1].connect_frame(REALM, node_id=b"\x09" * 32, name="other"))
        assert err.type is MessageType.ERROR and err.body["code"] == "already_connected"
        assert {p.peer.name for p in victim.transport._incoming if p.peer} == {"same"}
    finally:
        for raw in raws:
            raw.close()


async def test_unfinished_frames_are_bounded_in_size(nodes, certs):
    """Once, one connection could pin more than 1 MiB per stream in unfinished frames, with no deadline."""
    victim = await nodes("node-1", realm=REALM)
    raw = await session(victim, certs)
    try:
        size = victim.transport.max_frame_size
        head = HEADER.pack(1, MessageType.CALL, 0, 0, size)
        replies = await asyncio.gather(
            *(raw.exchange(head + b"\0" * (size - 10), end=False, wait=15.0) for _ in range(3))
        )
        # two frames' worth may be buffered; the stream that goes over is refused
        assert [r[0].body["code"] for r in replies if r] == ["frame_too_large"]
        assert victim.transport.stats()["bad_frames"] >= 1
        reply = await ask(raw, MessageType.PING, {})
        assert reply.type is MessageType.PONG  # the connection still works
    finally:
        raw.close()


async def test_unfinished_frames_are_dropped_at_their_deadline(nodes, certs, monkeypatch):
    monkeypatch.setattr(quic, "PARTIAL_FRAME_DEADLINE", 0.5)
    victim = await nodes("node-1", realm=REALM)
    raw = await session(victim, certs)
    try:
        head = HEADER.pack(1, MessageType.CALL, 0, 0, 1000)
        [err] = await raw.exchange(head + b"\0" * 100, end=False, wait=10.0)  # and never the rest
        assert err.type is MessageType.ERROR and err.body["code"] == "truncated_frame"
        assert victim.transport.counters["dropped_partial_frames"] == 1
    finally:
        raw.close()


async def test_bad_frames_are_counted_always_and_logged_rarely(nodes, certs, caplog):
    """Once, every bad frame logged a WARNING (5,000 bad frames: 532 KiB of log)."""
    victim = await nodes("node-1", realm=REALM)
    raw = await session(victim, certs)
    try:
        with caplog.at_level(logging.WARNING, logger="macula_lab.transport.quic"):
            for _ in range(200):
                bad = raw_frame(MessageType.PING, {"id": "not-an-id"})
                rid = new_id()
                await raw.exchange(bad + raw_frame(MessageType.PING, {"id": rid}), wait=2.0)
        assert victim.transport.counters["bad_frames"] >= 200
        assert len([r for r in caplog.records if "bad frame" in r.getMessage()]) <= 2
    finally:
        raw.close()


@pytest.mark.parametrize("enabled", [True])
def test_retry_is_on_by_default(enabled):
    assert quic.QuicTransport.__init__.__kwdefaults__["retry"] is enabled
