"""Wire codec: round trips of every message type, streaming reassembly, named errors."""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from macula_lab.core.codec import HEADER, HEADER_SIZE, FrameDecoder, decode, encode
from macula_lab.core.messages import (
    ID_SIZE,
    NODE_ID_SIZE,
    SCHEMAS,
    Field,
    MessageType,
    _apply_checks,
    _validate_fully,
    validate,
)
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


# fields with a value rule (core/params.py) get values that follow it; the rules
# themselves are tested in tests/core/test_params.py
RULED = {
    "ttl": st.floats(1.0, 86400.0),
    "timeout": st.floats(0.001, 3600.0),
    "since": st.floats(0.0, 1e10),
    "max_attempts": st.integers(1, 100),
    "service": st.from_regex(r"[a-z0-9_-]{1,8}(\.[a-z0-9_-]{1,8}){0,3}", fullmatch=True),
    "realm": st.from_regex(r"[a-z]{1,8}(\.[a-z0-9]{1,8}){0,3}", fullmatch=True),
    "name": st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True) | st.just(""),
    "endpoint": st.sampled_from(["", "quic://node-1.lab:9443", "quic://10.0.0.5:9443", "mem://node-2"]),
    "strategy": st.sampled_from(["random", "round_robin", "first", "local_first", "least_loaded"]),
    "after": st.integers(0, 2**63 - 1),
    "watch": st.integers(0, 2**63 - 1),
    "lease": st.floats(0.001, 120.0),
    "kind": st.sampled_from(["stored", "removed", "expired"]),
    "events": st.lists(values, max_size=4),
    "metadata": st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8), max_size=4),
}


def field_strategy(f: Field, name: str = ""):
    if f.check is not None:
        return RULED[name]
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
            body[name] = draw(field_strategy(f, name))
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


# ------------------------------------------------- validate()'s fast path
class _Int(int):
    pass


class _Bytes(bytes):
    pass


class _Dict(dict):
    pass


# values that probe the exact-type fast path: bools for ints, subclasses, wrong sizes
odd_values = st.sampled_from(
    [None, True, False, 0, _Int(7), 1.5, "", "s", b"", b"\0" * ID_SIZE, b"\0" * NODE_ID_SIZE,
     _Bytes(b"\1" * ID_SIZE), [], (), {}, _Dict(a=1)]
)  # fmt: skip


@st.composite
def mutated_messages(draw):
    mtype, body = draw(messages())
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from([*SCHEMAS[mtype], "extra"]))
        if draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = draw(odd_values)
    return mtype, (_Dict(body) if draw(st.integers(0, 9)) == 0 else body)


def _outcome(check, mtype, body):
    try:
        return check(mtype, body) is body
    except CodecError as exc:
        return type(exc), str(exc)


@given(mutated_messages())
@settings(max_examples=500)
def test_fast_validation_agrees_with_the_full_check(msg):
    mtype, body = msg
    # the full check, then the value rules (what validate's slow path does): a mutated value
    # can break a rule ("" as a service name) whatever the path that checked its type
    assert _outcome(validate, mtype, body) == _outcome(_full, mtype, body)


def _full(mtype, body):
    return _apply_checks(mtype, _validate_fully(mtype, body))


def test_subclass_values_and_bodies_still_validate():
    assert validate(MessageType.PING, {"id": _Bytes(b"\0" * ID_SIZE)})
    assert validate(MessageType.PING, _Dict(id=b"\0" * ID_SIZE))
    with pytest.raises(InvalidField, match="must be a map"):
        validate(MessageType.PING, [("id", b"\0" * ID_SIZE)])


# ------------------------------------------------------ encoder and decoder
def test_encoder_recovers_after_a_failed_encode():
    with pytest.raises(MalformedPayload):
        encode(MessageType.CALL, {"id": b"\0" * 16, "procedure": "p", "args": [1, 2, object()]})
    with pytest.raises(MalformedPayload):
        encode(MessageType.CALL, {"id": b"\0" * 16, "procedure": "p", "args": 2**70})
    body = {"id": b"\1" * 16, "procedure": "p", "args": [1, 2, 3]}
    assert decode(encode(MessageType.CALL, body)).body == body


def test_encode_from_several_threads():
    def work(t: int) -> list[bytes]:
        return [
            encode(MessageType.CALL, {"id": bytes([t]) * 16, "procedure": f"p{t}", "args": [t, i] * 20})
            for i in range(300)
        ]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(4)))
    for t, frames in enumerate(results):
        for i, data in enumerate(frames):
            assert decode(data).body == {"id": bytes([t]) * 16, "procedure": f"p{t}", "args": [t, i] * 20}


def test_a_chunk_with_whole_frames_buffers_only_the_incomplete_tail():
    frames = [encode(MessageType.PING, {"id": bytes([i]) * ID_SIZE}) for i in range(3)]
    blob = b"".join(frames)
    dec = FrameDecoder()
    cut = len(frames[0]) + len(frames[1]) + 5
    assert [f.body["id"][0] for f in dec.feed(blob[:cut])] == [0, 1]
    assert dec.buffered == 5
    assert [f.body["id"][0] for f in dec.feed(blob[cut:])] == [2]
    assert dec.buffered == 0
    dec.finish()


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_decoder_accepts_any_bytes_like_chunk(kind):
    data = encode(MessageType.PING, {"id": b"\6" * ID_SIZE}) * 2
    dec = FrameDecoder()
    out = dec.feed(kind(data[:30])) + dec.feed(kind(data[30:]))
    assert [f.type for f in out] == [MessageType.PING] * 2
    dec.finish()
