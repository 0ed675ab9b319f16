import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from macula_lab.core.ids import (
    ID_BYTES,
    bucket_index,
    check_id,
    hex_short,
    random_id,
    random_id_in_bucket,
    service_key,
    xor_distance,
)
from macula_lab.errors import InvalidField

ids = st.binary(min_size=ID_BYTES, max_size=ID_BYTES)


@given(ids, ids)
def test_xor_is_symmetric_and_zero_only_on_identity(a, b):
    assert xor_distance(a, b) == xor_distance(b, a)
    assert xor_distance(a, a) == 0
    assert (xor_distance(a, b) == 0) == (a == b)


@given(ids, ids, ids)
def test_xor_triangle_inequality(a, b, c):
    assert xor_distance(a, c) <= xor_distance(a, b) + xor_distance(b, c)


@given(ids, ids, ids)
def test_xor_is_unidirectional(a, b, c):
    # for one origin, each distance names exactly one id: lookups converge
    assert (xor_distance(a, b) == xor_distance(a, c)) == (b == c)


@given(ids, ids)
def test_xor_matches_bytewise_big_endian(a, b):
    assert xor_distance(a, b) == int.from_bytes(bytes(x ^ y for x, y in zip(a, b, strict=True)), "big")


@given(ids, ids)
def test_bucket_index_is_bit_length_minus_one(a, b):
    if a == b:
        with pytest.raises(ValueError):
            bucket_index(a, b)
        return
    i = bucket_index(a, b)
    assert 0 <= i <= 255
    assert 2**i <= xor_distance(a, b) < 2 ** (i + 1)
    assert bucket_index(b, a) == i


def test_bucket_convention_255_is_farthest_half():
    zero = bytes(ID_BYTES)
    assert bucket_index(zero, b"\x80" + bytes(31)) == 255
    assert bucket_index(zero, bytes(31) + b"\x01") == 0
    assert bucket_index(zero, b"\xff" * 32) == 255


@given(ids, st.integers(min_value=0, max_value=255))
def test_random_id_in_bucket_lands_in_bucket(self_id, index):
    assert bucket_index(self_id, random_id_in_bucket(self_id, index)) == index


def test_random_id_in_bucket_rejects_bad_index():
    with pytest.raises(ValueError):
        random_id_in_bucket(random_id(), 256)


def test_random_id_shape_and_reproducible_rng():
    a, b = random_id(), random_id()
    assert len(a) == ID_BYTES and a != b
    assert random_id(random.Random(1)) == random_id(random.Random(1))
    assert random_id_in_bucket(a, 7, random.Random(2)) == random_id_in_bucket(a, 7, random.Random(2))


def test_service_key_is_sha256_with_separator():
    key = service_key("com.example", "svc.echo")
    assert key == hashlib.sha256(b"service\0com.example\0svc.echo").digest()
    assert len(key) == 32


def test_service_key_separates_realms_and_splits():
    assert service_key("realm.a", "svc") != service_key("realm.b", "svc")
    # moving the boundary between realm and name changes the key
    assert service_key("a.b", "c") != service_key("a", "b.c")
    assert service_key("ab", "c") != service_key("a", "bc")


@pytest.mark.parametrize("realm,name", [("", "svc"), ("a\0b", "svc"), ("realm", ""), (1, "svc")])
def test_service_key_rejects_bad_input(realm, name):
    with pytest.raises(InvalidField):
        service_key(realm, name)


def test_check_id_and_hex_short():
    node_id = bytes(range(32))
    assert check_id(node_id) is node_id
    with pytest.raises(InvalidField, match="32 bytes, got 3 bytes"):
        check_id(b"abc", "node_id")
    with pytest.raises(InvalidField):
        check_id("x" * 32)
    assert hex_short(node_id) == node_id.hex()[:12]
    assert hex_short(node_id, 4) == "0001"
