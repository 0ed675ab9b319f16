"""Wire codec: round trips of every message type, streaming reassembly, named errors."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from macula_lab.core.codec import HEADER, HEADER_SIZE, FrameDecoder, decode, encode
from macula_lab.core.messages import ID_SIZE, NODE_ID_SIZE, SCHEMAS, Field, MessageType
from macula_lab.errors import (
    CodecError,
    FrameTooLarge,
    InvalidField,
    MalformedPayload,
    MissingField,
    TruncatedFrame,
    UnknownType,
    UnknownVersion,
)

# msgpack-able values for "any" fields (args, results)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def field_strategy(f: Field):
    if f.types is None:
        return values
    t = f.types[0]
    if t is bytes:
        return st.binary(min_size=f.size, max_size=f.size) if f.size else st.binary(max_size=40)
    if t is str:
        return st.text(max_size=30)
    if t is bool:
        return st.booleans()
    if t is int:
        return st.integers(-(2**31), 2**31)
    if t in (list, tuple):
        return st.lists(values, max_size=4)
    if t is dict:
        return st.dictionaries(st.text(max_size=8), values, max_size=4)
    raise AssertionError(t)


@st.composite
def messages(draw):
    mtype = draw(st.sampled_from(list(MessageType)))
    body = {}
    for name, f in SCHEMAS[mtype].items():
        if f.required or draw(st.booleans()):
            body[name] = draw(field_strategy(f))
    return mtype, body


def _norm(v):
    """msgpack turns tuples into lists; compare on that footing."""
    if isinstance(v, tuple | list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


@given(messages())
@settings(max_examples=300)
def test_every_message_type_round_trips(msg):
    mtype, body = msg
    frame = decode(encode(mtype, body))
    assert frame.type is mtype
    assert frame.body == _norm(body)


def test_every_type_is_covered_by_a_schema():
    assert set(SCHEMAS) == set(MessageType)


def test_header_layout_matches_reference():
    data = encode(MessageType.PING, {"id": b"\x01" * ID_SIZE})
    version, mtype, flags, reserved, length = struct.unpack(">BBBBI", data[:8])
    assert (version, mtype, flags, reserved) == (1, 0x03, 0, 0)
    assert length == len(data) - 8


@given(st.lists(messages(), min_size=1, max_size=6), st.data())
@settings(max_examples=100)
def test_stream_reassembly_any_split(msgs, data):
    """Frames split across chunks and several frames per chunk come out intact."""
    blob = b"".join(encode(t, b) for t, b in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=8)))
    chunks, prev = [], 0
    for c in [*cuts, len(blob)]:
        chunks.append(blob[prev:c])
        prev = c
    dec = FrameDecoder()
    out = []
    for ch in chunks:
        out.extend(dec.feed(ch))
    dec.finish()
    assert [(f.type, f.body) for f in out] == [(t, _norm(b)) for t, b in msgs]


@given(st.binary(max_size=4096))
@settings(max_examples=500)
def test_arbitrary_bytes_only_raise_codec_errors(blob):
    dec = FrameDecoder(max_frame_size=1024)
    try:
        for item in dec.feed(blob):
            assert isinstance(item, CodecError) or item.type in MessageType
        dec.finish()
    except CodecError:
        pass
    assert dec.buffered <= 1024 + HEADER_SIZE


@given(st.lists(st.binary(max_size=600), max_size=8))
@settings(max_examples=200)
def test_arbitrary_chunks_never_buffer_past_limit(chunks):
    dec = FrameDecoder(max_frame_size=256)
    for ch in chunks:
        try:
            dec.feed(ch)
        except CodecError:
            break
        # at most one header plus one payload of the limit, plus the last chunk's tail
        assert dec.buffered <= HEADER_SIZE + 256 + len(ch)


def test_oversized_frame_refused_from_header_before_buffering():
    dec = FrameDecoder(max_frame_size=1000)
    header = HEADER.pack(1, MessageType.PING, 0, 0, 10**9)
    items = dec.feed(header)
    assert isinstance(items[-1], FrameTooLarge)
    assert dec.failed is items[-1]
    assert dec.buffered == 0
    with pytest.raises(FrameTooLarge):
        dec.feed(b"x" * 100)


def test_default_limit_is_one_mib():
    big = {"id": b"\0" * ID_SIZE, "procedure": "p", "args": b"x" * (1 << 20)}
    with pytest.raises(FrameTooLarge):
        encode(MessageType.CALL, big)
    ok = {"id": b"\0" * ID_SIZE, "procedure": "p", "args": b"x" * ((1 << 20) - 100)}
    assert FrameDecoder().feed(encode(MessageType.CALL, ok))[0].type is MessageType.CALL


def test_frames_before_a_fatal_error_are_kept():
    good = encode(MessageType.PING, {"id": b"\2" * ID_SIZE})
    bad = HEADER.pack(7, MessageType.PING, 0, 0, 0)
    items = FrameDecoder().feed(good + bad)
    assert items[0].type is MessageType.PING
    assert isinstance(items[1], UnknownVersion)


def _raw(mtype: int, payload: bytes) -> bytes:
    return HEADER.pack(1, mtype, 0, 0, len(payload)) + payload


def test_unknown_type_is_a_value_with_request_id_and_stream_continues():
    rid = b"\3" * ID_SIZE
    data = _raw(0x7F, msgpack.packb({"id": rid})) + encode(MessageType.PING, {"id": rid})
    items = FrameDecoder().feed(data)
    assert isinstance(items[0], UnknownType) and items[0].request_id == rid
    assert items[1].type is MessageType.PING


@pytest.mark.parametrize(
    "payload, error",
    [
        (b"\xc1", MalformedPayload),  # never-used msgpack byte
        (msgpack.packb([1, 2]), MalformedPayload),  # not a map
        (msgpack.packb({"x": 1}), MissingField),
        (msgpack.packb({"id": "not bytes"}), InvalidField),
        (msgpack.packb({"id": b"short"}), InvalidField),
    ],
)
def test_payload_problems_have_names(payload, error):
    items = FrameDecoder().feed(_raw(MessageType.PING, payload))
    assert isinstance(items[0], error)


def test_mistyped_field_keeps_request_id():
    rid = b"\4" * ID_SIZE
    items = FrameDecoder().feed(_raw(MessageType.FIND_NODE, msgpack.packb({"id": rid, "target": 5})))
    assert isinstance(items[0], InvalidField) and items[0].request_id == rid


def test_bool_is_not_an_int():
    with pytest.raises(InvalidField):
        encode(
            MessageType.CONNECT,
            {
                "id": b"\0" * 16,
                "version": True,
                "node_id": b"\0" * NODE_ID_SIZE,
                "realm": "r",
                "capabilities": [],
            },
        )


def test_truncated_stream():
    data = encode(MessageType.PING, {"id": b"\5" * ID_SIZE})
    for cut in (3, HEADER_SIZE, len(data) - 1):
        dec = FrameDecoder()
        assert dec.feed(data[:cut]) == []
        with pytest.raises(TruncatedFrame):
            dec.finish()


def test_unserialisable_body_is_a_codec_error():
    with pytest.raises(MalformedPayload):
        encode(MessageType.CALL, {"id": b"\0" * 16, "procedure": "p", "args": object()})
