"""Sans-I/O wire codec: 8-byte header + one msgpack map.

    offset 0  version      1 byte   (always 1)
    offset 1  type         1 byte   (MessageType)
    offset 2  flags        1 byte   (0, ignored on decode)
    offset 3  reserved     1 byte   (0, ignored on decode)
    offset 4  payload_len  uint32 big-endian
    offset 8  payload      msgpack map

Strings travel as msgpack str, binary data (ids, keys) as msgpack bin.
The size limit is checked from the header, before any payload is buffered, so a
peer cannot make us allocate more than ``max_frame_size`` bytes per stream.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import msgpack

from ..errors import (
    CodecError,
    FrameTooLarge,
    MalformedPayload,
    TruncatedFrame,
    UnknownType,
    UnknownVersion,
)
from .messages import ID_SIZE, PROTOCOL_VERSION, Frame, MessageType, validate

HEADER = struct.Struct(">BBBBI")
HEADER_SIZE = HEADER.size  # 8
DEFAULT_MAX_FRAME_SIZE = 1 << 20  # 1 MiB of payload

_TYPES = {int(t): t for t in MessageType}

# msgpack.packb() builds a Packer (and its buffer) per call, a third of encode()'s
# time; a kept Packer is reused instead.  One per thread: a Packer is not
# thread-safe.  It resets its buffer after a failed pack() too.
_local = threading.local()


def _packer() -> msgpack.Packer:
    packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def encode(
    mtype: MessageType, body: dict[str, Any], *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """Validate and encode one frame.  Raises the codec's errors on bad input."""
    validate(mtype, body)
    try:
        packer = _local.packer
    except AttributeError:  # the first frame this thread encodes
        packer = _packer()
    try:
        payload = packer.pack(body)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedPayload(f"{mtype.name} body is not msgpack-serialisable: {exc}") from None
    if len(payload) > max_frame_size:
        raise FrameTooLarge(f"{mtype.name} payload is {len(payload)} bytes, limit {max_frame_size}")
    return HEADER.pack(PROTOCOL_VERSION, mtype, 0, 0, len(payload)) + payload


def decode_payload(mtype: MessageType, payload: bytes | memoryview) -> Frame:
    """Decode and validate one payload of a known type."""
    try:
        body = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises a zoo of exception types
        raise MalformedPayload(f"{mtype.name} payload is not valid msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedPayload(f"{mtype.name} payload must be a map, got {type(body).__name__}")
    try:
        validate(mtype, body)
    except CodecError as exc:
        exc.request_id = _request_id(body)  # type: ignore[attr-defined]
        raise
    return Frame(mtype, body)


def _request_id(body: dict) -> bytes | None:
    rid = body.get("id")
    return rid if isinstance(rid, bytes) and len(rid) == ID_SIZE else None


def decode(data: bytes) -> Frame:
    """Decode exactly one complete frame (no trailing bytes allowed)."""
    decoder = FrameDecoder(max_frame_size=max(len(data), 1))
    items = decoder.feed(data)
    if decoder.failed is not None:
        raise decoder.failed
    decoder.finish()
    if len(items) != 1:
        raise MalformedPayload(f"expected one frame, got {len(items)}")
    if isinstance(items[0], CodecError):
        raise items[0]
    return items[0]


class FrameDecoder:
    """Streaming decoder for one byte stream.

    ``feed(chunk)`` returns the frames completed by that chunk (a frame may be
    split across chunks; a chunk may hold several frames).  Per-frame problems
    whose boundaries are known (unknown type, bad msgpack, missing field) are
    returned in the list as error *values* carrying ``request_id`` when one
    could be read, so the caller can answer that request and carry on.
    Problems that lose the framing (unknown version, oversized frame) end the
    list (frames completed before them are still returned) and set
    :attr:`failed`; the stream must then be abandoned, and a further ``feed``
    raises that error.  Nothing but :class:`CodecError` ever escapes.
    """

    __slots__ = ("max_frame_size", "_buf", "_need", "_type", "failed")

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE):
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._need = -1  # payload length of the frame in progress, -1: header pending
        self._type = 0
        self.failed: CodecError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | CodecError]:
        if self.failed is not None:
            raise self.failed
        if self._buf:  # a frame is partly buffered: append and parse from the buffer
            self._buf += data
            buf = self._buf
        else:  # the common case: parse the chunk in place and buffer only an incomplete tail
            buf = data
        out: list[Frame | CodecError] = []
        end = len(buf)
        pos = 0
        while True:
            if self._need < 0:
                if end - pos < HEADER_SIZE:
                    break
                version, mtype, _flags, _res, length = HEADER.unpack_from(buf, pos)
                if version != PROTOCOL_VERSION:
                    out.append(
                        self._fail(
                            UnknownVersion(
                                f"protocol version {version} (this node speaks {PROTOCOL_VERSION})"
                            )
                        )
                    )
                    return out
                if length > self.max_frame_size:
                    out.append(
                        self._fail(
                            FrameTooLarge(f"frame of {length} bytes announced, limit {self.max_frame_size}")
                        )
                    )
                    return out
                pos += HEADER_SIZE
                self._need = length
                self._type = mtype
            if end - pos < self._need:
                break
            payload = buf[pos : pos + self._need]
            pos += self._need
            self._need = -1
            out.append(self._one(self._type, payload))
        if buf is self._buf:
            del buf[:pos]
        elif pos < end:
            self._buf += buf[pos:]
        return out

    def finish(self) -> None:
        """Call at end of stream: raises :class:`TruncatedFrame` if a frame is incomplete."""
        if self.failed is not None:
            raise self.failed
        if self._buf or self._need >= 0:
            got = len(self._buf)
            self._buf.clear()
            if self._need >= 0:
                raise TruncatedFrame(f"stream ended with {got} of {self._need} payload bytes")
            raise TruncatedFrame(f"stream ended with {got} bytes of an 8-byte header")

    def _one(self, code: int, payload: bytes) -> Frame | CodecError:
        mtype = _TYPES.get(code)
        if mtype is None:
            err = UnknownType(f"unknown message type 0x{code:02x}")
            try:
                err.request_id = _request_id(msgpack.unpackb(payload, raw=False))  # type: ignore[attr-defined]
            except Exception:
                err.request_id = None  # type: ignore[attr-defined]
            return err
        try:
            return decode_payload(mtype, payload)
        except CodecError as exc:
            if not hasattr(exc, "request_id"):
                exc.request_id = None  # type: ignore[attr-defined]
            return exc

    def _fail(self, exc: CodecError) -> CodecError:
        exc.request_id = None  # type: ignore[attr-defined]
        self.failed = exc
        self._buf.clear()
        self._need = -1
        return exc
