"""256-bit identifiers and the XOR metric of the Kademlia DHT.

Node ids and DHT keys are both 32-byte ``bytes`` (unlike the reference, which
accepted ids of any length and hashed the odd ones on the fly: here a wrong
length is an error).  The distance between two ids is their bitwise XOR read as
an unsigned big-endian integer, which is a metric (``d(a, a) = 0``, symmetric,
triangle inequality) and *unidirectional*: for a given ``a`` and distance there
is exactly one ``b``, so lookups for the same key converge on the same nodes.

Bucket convention (the common one, not the reference's): a contact lives in
bucket ``i = bit_length(distance) - 1``, so bucket 255 holds the farthest half of
the id space (first bit differs), bucket 254 the next quarter, ... and bucket 0
the single id that differs only in the last bit.  Equivalently
``i = 255 - common_prefix_length``.  The reference numbered them the other way
round (leading zero bits), which only matters when comparing table dumps.
"""

from __future__ import annotations

import hashlib
import random

from ..errors import InvalidField
from . import entropy

ID_BITS = 256
ID_BYTES = ID_BITS // 8

_ID_MASK = (1 << ID_BITS) - 1


def check_id(value: object, what: str = "id") -> bytes:
    """Return ``value`` if it is a 32-byte id, else raise :class:`InvalidField`."""
    if not isinstance(value, bytes) or len(value) != ID_BYTES:
        shown = f"{len(value)} bytes" if isinstance(value, bytes | bytearray) else type(value).__name__
        raise InvalidField(f"{what} must be {ID_BYTES} bytes, got {shown}")
    return value


def id_to_int(node_id: bytes) -> int:
    return int.from_bytes(node_id, "big")


def int_to_id(value: int) -> bytes:
    return (value & _ID_MASK).to_bytes(ID_BYTES, "big")


def xor_distance(a: bytes, b: bytes) -> int:
    """XOR distance of two ids as a non-negative int (0 iff ``a == b``)."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def bucket_index(self_id: bytes, other_id: bytes) -> int:
    """Index of the k-bucket ``other_id`` belongs to in ``self_id``'s table.

    ``bit_length(distance) - 1``: 255 = farthest half, 0 = nearest.  Raises
    ``ValueError`` for ``other_id == self_id`` (a node never stores itself).
    """
    distance = xor_distance(self_id, other_id)
    if distance == 0:
        raise ValueError("an id has no bucket in its own table")
    return distance.bit_length() - 1


def random_id(rng: random.Random | None = None) -> bytes:
    """A fresh random id (node ids, lookup targets); pass ``rng`` for a reproducible simulation."""
    return entropy.randbytes(ID_BYTES) if rng is None else rng.randbytes(ID_BYTES)


def random_id_in_bucket(self_id: bytes, index: int, rng: random.Random | None = None) -> bytes:
    """A random id that falls in bucket ``index`` of ``self_id``'s table.

    Used for bucket refresh: a lookup of this id explores exactly that range.
    The distance has bit ``index`` set, random bits below it and zeros above.
    """
    if not 0 <= index < ID_BITS:
        raise ValueError(f"bucket index must be in 0..{ID_BITS - 1}, got {index}")
    low = id_to_int(random_id(rng)) & ((1 << index) - 1)
    distance = (1 << index) | low
    return int_to_id(id_to_int(self_id) ^ distance)


def service_key(realm: str, name: str) -> bytes:
    """The DHT key of service ``name`` in ``realm``.

    ``SHA-256(b"service\\0" + realm + b"\\0" + name)`` (UTF-8).  The realm cannot
    contain NUL, so the first NUL after the tag ends it and ``("a.b", "c")`` can
    never collide with ``("a", "b\\0c")``-like splits: realms never see each
    other's records.  The ``service`` tag keeps services apart from any other
    kind of key we add later (the reference hashed topics and procedures into
    one space, so a topic and a procedure with the same name collided).
    """
    if not isinstance(realm, str) or not isinstance(name, str):
        raise InvalidField("realm and service name must be strings")
    if not realm or "\0" in realm:
        raise InvalidField(f"invalid realm {realm!r}: must be non-empty and contain no NUL")
    if not name:
        raise InvalidField("service name must be non-empty")
    data = b"service\0" + realm.encode() + b"\0" + name.encode()
    return hashlib.sha256(data).digest()


def hex_short(node_id: bytes, length: int = 12) -> str:
    """The first ``length`` hex digits of an id, for logs and tables."""
    return node_id.hex()[:length]
