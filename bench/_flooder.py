"""The flooder of ``bench/hostile.py``: one hostile process attacking one node.

Not a benchmark itself, and not meant to be run by hand: ``hostile.py`` starts
it as ``python bench/_flooder.py CONFIG.json`` and drives it over its stdin and
stdout, one JSON object or word per line:

1. the flooder reads the config, prepares everything that costs CPU up front
   (the Initial packets of the half-open handshakes, the STORE and bad frames)
   so that the bench's quiet phase runs undisturbed, then prints
   ``{"event": "ready"}``;
2. on the line ``go`` it starts every configured attack at once, each spreading
   its sends evenly over ``window`` seconds and then holding what it opened;
3. on the line ``stop`` (or end of input: the bench is gone) it prints
   ``{"event": "report", "attacks": {...}}`` with what each attack sent and
   what the node answered, closes its connections and exits 0.

Attacks (``config["attacks"]``, each present only if configured):

``halfopen`` (N)
    N QUIC handshakes that never complete: a client Initial packet each (built
    with aioquic's ``QuicConnection``, so each has its own connection id and
    TLS ClientHello), sent from a few UDP sockets whose replies are counted but
    never answered.  No raw sockets; every packet goes to the node on loopback.
``idle`` (N, ``idle_cert``)
    N QUIC connections that complete TLS (with the lab client certificate
    ``cert``/``key`` if ``idle_cert``, else none) and then stay idle; every
    second one sends a CONNECT (as a pure client, no endpoint) and nothing more.
``store`` (N)
    N STORE frames with forged provider entries, built by hand (msgpack + the
    8-byte header), over ``store_identities`` sessions in turn, each a new
    connection whose CONNECT claims a new node id and a (blackhole) endpoint:
    ``store_service`` forged providers under the node's own service key, one
    entry naming the node itself as provider with seq 2**64-1 and a dead
    endpoint, and the rest one forged provider each under a fresh random key.
    Every forged endpoint is one of the bench's ``blackholes`` (UDP sockets on
    loopback that never answer).
``badframe`` (N)
    N malformed frames on one connection: four in five
    are per-frame errors on one long-lived stream (unknown type, bad msgpack,
    a payload that is not a map, missing fields, wrong types); one in five ends
    its stream (bad version, oversized length, truncated then finished, random
    bytes) and goes on a stream of its own.  A connection the node closes is
    replaced by a new one.
``partial`` (MiB)
    One connection opens that many streams, each with a
    frame header announcing the largest payload the node accepts and all of
    that payload but its last byte, and never finishes them.

Connections present the lab client certificate ``cert``/``key`` unless
``use_cert`` is false (``idle`` follows ``idle_cert``); the flooder does not
verify the node's certificate (an attacker has no reason to).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import random
import resource
import ssl
import struct
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

HEADER = struct.Struct(">BBBBI")  # the codec's header: version, type, flags, reserved, payload length
VERSION = 1
# message type codes (macula_lab/core/messages.py); frames are built by hand on purpose
CONNECT, ERROR, CALL, STORE, STORE_REPLY = 0x01, 0x06, 0x20, 0x42, 0x45
CONNECT_ACK = 0x05
REQUESTS = {0x03: "PING", 0x20: "CALL", 0x40: "FIND_NODE", 0x42: "STORE", 0x43: "FIND_VALUE", 0x46: "REMOVE"}
MAX_SEQ = (1 << 64) - 1
MAX_TTL = 24 * 3600.0
ALPN = "macula"
TICK = 0.01  # pacing granularity, seconds


def log(msg: str) -> None:
    print(f"[flooder] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def frame(mtype: int, body: Any) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(VERSION, mtype, 0, 0, len(payload)) + payload


def rid() -> bytes:
    return os.urandom(16)


def connect_frame(realm: str, name: str, endpoint: str = "") -> bytes:
    """A CONNECT claiming a random node id: a pure client, or a node listening at ``endpoint``."""
    body = {
        "id": rid(),
        "version": VERSION,
        "node_id": os.urandom(32),
        "realm": realm,
        "capabilities": [],
        "endpoint": endpoint,
        "name": name,
    }
    return frame(CONNECT, body)


async def paced(items: list[Any], window: float, send) -> None:
    """Call ``send(item)`` for every item, spread evenly over ``window`` seconds."""
    loop = asyncio.get_running_loop()
    n = len(items)
    if n == 0:
        return
    is_coro = asyncio.iscoroutinefunction(send)
    t0 = loop.time()
    step = window / n if window > 0 else 0.0
    i = 0
    while i < n:
        due = n if step == 0 else min(n, int((loop.time() - t0) / step) + 1)
        while i < due:
            if is_coro:
                await send(items[i])
            else:
                send(items[i])
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, min(TICK, t0 + i * step - loop.time())))


# ================================================================ QUIC client
class Peer(QuicConnectionProtocol):
    """A bare aioquic client: sends whatever bytes it is given, parses replies without validating them."""

    def __init__(self, quic: QuicConnection, stats: collections.Counter):
        super().__init__(quic)
        self.stats = stats
        self._bufs: dict[int, bytearray] = {}
        self.terminated = False
        self.closing = False
        self.replies: dict[int, list[tuple[int, dict]]] = collections.defaultdict(list)
        self.reply_event = asyncio.Event()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            buf = self._bufs.setdefault(event.stream_id, bytearray())
            buf += event.data
            while len(buf) >= HEADER.size:
                _v, mtype, _f, _r, length = HEADER.unpack_from(buf)
                if len(buf) < HEADER.size + length:
                    break
                payload = bytes(buf[HEADER.size : HEADER.size + length])
                del buf[: HEADER.size + length]
                self._on_frame(event.stream_id, mtype, payload)
            if event.end_stream:
                self._bufs.pop(event.stream_id, None)
        elif isinstance(event, events.StreamReset):
            self.stats["stream_resets_by_victim"] += 1
        elif isinstance(event, events.StopSendingReceived):
            self.stats["stop_sending_by_victim"] += 1
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = True
            if not self.closing:
                self.stats["closed_by_victim"] += 1
                reason = event.reason_phrase or f"error 0x{event.error_code:x}"
                self.stats[f"close reason: {reason[:60]}"] += 1

    def _on_frame(self, stream_id: int, mtype: int, payload: bytes) -> None:
        try:
            body = msgpack.unpackb(payload, raw=False)
        except Exception:
            self.stats["undecodable_replies"] += 1
            return
        if not isinstance(body, dict):
            body = {}
        if mtype == ERROR:
            self.stats[f"error:{body.get('code')}"] += 1
        elif mtype == STORE_REPLY:
            self.stats["stored" if body.get("stored") else "refused"] += 1
        elif mtype in REQUESTS:  # the node uses our session: it believes the endpoint we claimed
            self.stats[f"requests from the node: {REQUESTS[mtype]}"] += 1
        elif mtype != CONNECT_ACK:  # (sessions are counted by the attack that asked)
            self.stats[f"frames of type 0x{mtype:02x}"] += 1
        self.replies[stream_id].append((mtype, body))
        self.reply_event.set()

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self._quic.send_stream_data(stream_id, data, end_stream=end)
        self.transmit()

    def new_stream(self) -> int:
        return self._quic.get_next_available_stream_id()

    def shut(self) -> None:
        self.closing = True
        if not self.terminated:
            with contextlib.suppress(Exception):
                self.close()


class Flooder:
    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        host, port = cfg["victim_host"], cfg["victim_port"]
        self.addr = (host, port)
        self.window = float(cfg["window"])
        self.attacks: dict[str, Any] = cfg["attacks"]
        self.stats: dict[str, collections.Counter] = {a: collections.Counter() for a in self.attacks}
        self.peers: list[Peer] = []
        self.transports: list[asyncio.BaseTransport] = []
        self._initials: list[bytes] = []
        self._stores: list[bytes] = []
        self._bad: list[tuple[bool, bytes]] = []
        self.tasks: list[asyncio.Task] = []
        self._templates: dict[bool, QuicConfiguration] = {}

    # ------------------------------------------------------------ prepare
    def prepare(self) -> None:
        t0 = time.perf_counter()
        if "halfopen" in self.attacks:
            self._initials = self._make_initials(int(self.attacks["halfopen"]))
        if "store" in self.attacks:
            self._stores = self._make_stores(int(self.attacks["store"]))
        if "badframe" in self.attacks:
            self._bad = self._make_bad_frames(int(self.attacks["badframe"]))
        log(f"prepared in {time.perf_counter() - t0:.1f} s: {sorted(self.attacks)}")

    def _make_initials(self, n: int) -> list[bytes]:
        config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=self.cfg["victim_host"])
        config.verify_mode = ssl.CERT_NONE  # never gets that far
        out = []
        now = time.time()
        for _ in range(n):
            quic = QuicConnection(configuration=config)
            quic.connect(self.addr, now=now)
            out.extend(data for data, _ in quic.datagrams_to_send(now=now))
        return out

    def _make_stores(self, n: int) -> list[bytes]:
        key = bytes.fromhex(self.cfg["service_key"])
        blackholes = self.cfg["blackholes"]
        n_service = min(n, int(self.cfg.get("store_service", 150)))
        frames = []

        def store(k: bytes, node_id: bytes, seq: int, i: int) -> bytes:
            value = {
                "node_id": node_id,
                "endpoint": blackholes[i % len(blackholes)],
                "metadata": {},
                "ttl": MAX_TTL,
                "seq": seq,
            }
            return frame(STORE, {"id": rid(), "key": k, "value": value})

        if n > 0:  # the node itself as provider of its own service, at a dead endpoint, seq at the maximum
            frames.append(store(key, bytes.fromhex(self.cfg["victim_id"]), MAX_SEQ, 0))
        for i in range(1, n_service):
            frames.append(store(key, os.urandom(32), MAX_SEQ, i))
        for i in range(len(frames), n):
            frames.append(store(os.urandom(32), os.urandom(32), MAX_SEQ, i))
        return frames

    def _make_bad_frames(self, n: int) -> list[tuple[bool, bytes]]:
        """(ends its stream, bytes): four kinds in five keep the stream usable, one in five kills it."""
        rng = random.Random(13)

        per_frame = [
            lambda: frame(0x7F, {"id": rid()}),  # unknown type
            lambda: HEADER.pack(VERSION, CALL, 0, 0, 4) + b"\xc1\xc1\xc1\xc1",  # not msgpack
            lambda: frame(CALL, [1, 2, 3]),  # not a map
            lambda: frame(STORE, {"id": rid()}),  # missing fields
            lambda: frame(STORE, {"id": rid(), "key": "not bytes", "value": 7}),  # wrong types
        ]
        fatal = [
            lambda: HEADER.pack(9, CALL, 0, 0, 4) + b"\x80\x80\x80\x80",  # unknown version
            lambda: HEADER.pack(VERSION, CALL, 0, 0, 0xFFFFFFFF),  # oversized
            lambda: HEADER.pack(VERSION, CALL, 0, 0, 100) + b"\x81" * 10,  # truncated, then the stream ends
            lambda: bytes([rng.choice([0, 2, 3, 0xFF])]) + rng.randbytes(rng.randrange(8, 200)),  # garbage
        ]
        out = []
        for i in range(n):
            if i % 5 == 4:
                out.append((True, fatal[(i // 5) % len(fatal)]()))
            else:
                out.append((False, per_frame[i % len(per_frame)]()))
        return out

    # ---------------------------------------------------------------- run
    def start(self) -> None:
        runners = {
            "halfopen": self._halfopen,
            "idle": self._idle,
            "store": self._store,
            "badframe": self._badframe,
            "partial": self._partial,
        }
        for name in self.attacks:
            self.tasks.append(asyncio.get_running_loop().create_task(self._guard(name, runners[name]())))

    async def _guard(self, name: str, coro) -> None:
        t0 = time.perf_counter()
        try:
            await coro
        except asyncio.CancelledError:
            self.stats[name]["unfinished_at_stop"] += 1
            raise
        except Exception as exc:  # an attack that fails is reported, the others go on
            self.stats[name][f"attack failed: {type(exc).__name__}: {exc}"[:120]] += 1
            log(f"{name} failed: {type(exc).__name__}: {exc}")
        finally:
            self.stats[name]["send_seconds"] = round(time.perf_counter() - t0, 2)

    def _config(self, cert: bool) -> QuicConfiguration:
        """A client configuration; certificate files are read once (a copy of a template per connection)."""
        template = self._templates.get(cert)
        if template is None:
            template = QuicConfiguration(
                is_client=True,
                alpn_protocols=[ALPN],
                server_name=self.cfg["victim_host"],
                idle_timeout=600.0,  # idle connections stay up for the whole phase
                max_data=16 * 1024 * 1024,
                max_stream_data=4 * 1024 * 1024,
            )
            # an attacker has no reason to verify the node: it saves the flooder CPU per handshake
            template.verify_mode = ssl.CERT_NONE
            if cert:
                template.load_cert_chain(self.cfg["cert"], self.cfg["key"])
            self._templates[cert] = template
        return dataclasses.replace(template)

    async def _open(self, stats: collections.Counter, *, cert: bool | None = None) -> Peer:
        """A connection that completed TLS; ``cert``: present the client certificate (default: ``use_cert``)."""
        config = self._config(bool(self.cfg.get("use_cert", True)) if cert is None else cert)
        loop = asyncio.get_running_loop()
        transport, peer = await loop.create_datagram_endpoint(
            lambda: Peer(QuicConnection(configuration=config), stats),
            remote_addr=self.addr,
        )
        self.transports.append(transport)
        self.peers.append(peer)
        peer.connect(self.addr)
        await asyncio.wait_for(peer.wait_connected(), 10.0)
        return peer

    async def _connect_session(
        self, peer: Peer, stats: collections.Counter, name: str, endpoint: str = ""
    ) -> int:
        """Send CONNECT on a new stream (the session's main stream); wait up to 5 s for the answer."""
        sid = peer.new_stream()
        peer.send(sid, connect_frame(self.cfg["realm"], name, endpoint))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                while not peer.replies.get(sid) and not peer.terminated:
                    peer.reply_event.clear()
                    await peer.reply_event.wait()
        got = peer.replies.get(sid)
        if not got:
            stats["session: no answer to CONNECT"] += 1
        elif got[0][0] == CONNECT_ACK:
            stats["session: accepted"] += 1
        else:
            stats[f"session: refused ({got[0][1].get('code')})"] += 1
        return sid

    async def _halfopen(self) -> None:
        st = self.stats["halfopen"]
        st["planned"] = len(self._initials)
        loop = asyncio.get_running_loop()

        class Sink(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                st["datagrams_back"] += 1
                st["bytes_back"] += len(data)

        sockets = []
        for _ in range(min(16, max(1, len(self._initials)))):  # many source ports, no spoofing needed
            transport, _ = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
            self.transports.append(transport)
            sockets.append(transport)
        counter = iter(range(len(self._initials)))

        def send(data: bytes) -> None:
            sockets[next(counter) % len(sockets)].sendto(data, self.addr)
            st["sent"] += 1

        await paced(self._initials, self.window, send)

    async def _idle(self) -> None:
        st = self.stats["idle"]
        n = int(self.attacks["idle"])
        cert = bool(self.cfg.get("idle_cert", True))
        st["planned"] = n
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with sem:
                try:
                    peer = await self._open(st, cert=cert)
                except Exception as exc:  # refused handshake, timeout
                    st[f"handshake failed: {type(exc).__name__}"] += 1
                    return
                st["connected"] += 1
                if i % 2:
                    await self._connect_session(peer, st, f"idle-{i}")

        pending: list[asyncio.Task] = []

        def launch(i: int) -> None:
            pending.append(asyncio.get_running_loop().create_task(one(i)))

        try:
            await paced(list(range(n)), self.window, launch)
            await asyncio.gather(*pending)
        finally:
            for t in pending:
                t.cancel()

    async def _store(self) -> None:
        """The STOREs on ``store_identities`` sessions, one after the other, each as a new node.

        Each session is a new connection whose CONNECT claims a new node id and one of
        the blackhole endpoints (a node, not a client: nodes store).  While identities
        are mere claims, a per-peer quota is no bound for one process.
        """
        st = self.stats["store"]
        st["planned"] = len(self._stores)
        holes = self.cfg["blackholes"]
        n_ids = max(1, min(int(self.cfg.get("store_identities", 1)), len(self._stores) or 1))
        per_id = -(-len(self._stores) // n_ids)
        sessions: list[tuple[Peer, int]] = []

        async def session(i: int) -> tuple[Peer, int]:
            while len(sessions) <= i:
                k = len(sessions)
                peer = await self._open(st)
                sid = await self._connect_session(peer, st, f"flooder-{k}", holes[k % len(holes)])
                st["identities"] += 1
                sessions.append((peer, sid))
            return sessions[i]

        async def send(item: tuple[int, bytes]) -> None:
            i, data = item
            peer, sid = await session(i // per_id)
            if not peer.terminated:
                peer._quic.send_stream_data(sid, data)
                st["sent"] += 1

        async def flush() -> None:
            while True:
                for peer, _ in sessions:
                    peer.transmit()
                await asyncio.sleep(TICK)

        flusher = asyncio.get_running_loop().create_task(flush())
        try:
            await paced(list(enumerate(self._stores)), self.window, send)
        finally:
            flusher.cancel()
            for peer, _ in sessions:
                peer.transmit()

    async def _badframe(self) -> None:
        st = self.stats["badframe"]
        st["planned"] = len(self._bad)
        state: dict[str, Any] = {"peer": None, "main": None}

        async def peer_now() -> Peer:
            peer = state["peer"]
            if peer is None or peer.terminated:
                if st["connections"] >= 100:
                    raise RuntimeError("the node closed 100 connections; giving up")
                peer = state["peer"] = await self._open(st)
                state["main"] = peer.new_stream()
                st["connections"] += 1
            return peer

        async def send(item: tuple[bool, bytes]) -> None:
            fatal, data = item
            peer = await peer_now()
            if fatal:
                peer._quic.send_stream_data(peer.new_stream(), data, end_stream=True)
            else:
                peer._quic.send_stream_data(state["main"], data)
            st["sent"] += 1
            st["sent_stream_fatal" if fatal else "sent_per_frame"] += 1
            if st["sent"] % 16 == 0:
                peer.transmit()

        try:
            await paced(self._bad, self.window, send)
        finally:
            if state["peer"] is not None:
                state["peer"].transmit()

    async def _partial(self) -> None:
        st = self.stats["partial"]
        streams = int(self.attacks["partial"])
        size = int(self.cfg.get("max_frame_size", 1 << 20))
        st["planned_streams"] = streams
        peer = await self._open(st)
        chunk = HEADER.pack(VERSION, CALL, 0, 0, size) + b"\x00" * (size - 1)

        def send(_: int) -> None:
            peer.send(peer.new_stream(), chunk)
            st["streams"] += 1
            st["bytes_queued"] += len(chunk)

        await paced(list(range(streams)), self.window, send)

    # ----------------------------------------------------------------- end
    async def stop(self) -> dict[str, Any]:
        for t in self.tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        report = {name: dict(st) for name, st in self.stats.items()}
        for peer in self.peers:
            peer.shut()
        await asyncio.sleep(0.2)  # let CONNECTION_CLOSE frames leave
        for transport in self.transports:
            transport.close()
        return report


async def read_line() -> str:
    return (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip()


async def main_async(cfg: dict[str, Any]) -> None:
    flooder = Flooder(cfg)
    flooder.prepare()
    emit({"event": "ready"})
    line = await read_line()
    if line == "go":
        flooder.start()
        emit({"event": "started"})
        line = await read_line()  # "stop", or "" when the bench is gone
    report = await flooder.stop()
    emit({"event": "report", "attacks": report})


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: _flooder.py CONFIG.json (started by bench/hostile.py)", file=sys.stderr)
        return 2
    cfg = json.loads(Path(argv[0]).read_text())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one UDP socket per connection
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard)
            )
    try:
        asyncio.run(main_async(cfg))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
