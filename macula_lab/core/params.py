"""Every parameter a person or a peer can set: its default, its limits and its check.

This module is the one owner of those rules.  The node and its config, the CLI,
the lab, attached clients, the widgets, the stored records and the wire schemas
all call the checks below, so a value is accepted or refused the same way
wherever it enters, and refused with the same named error,
:class:`~macula_lab.errors.InvalidField`, whose ``field`` names the parameter.
Values out of range are refused, never clamped: a TTL of two days is an error,
not a record that silently lapses after one.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgpack

from ..errors import InvalidField

# ------------------------------------------------------------------ defaults
DEFAULT_REALM = "com.test.lab"
DEFAULT_TTL = 300.0  # seconds a provider record lives, as in the reference system
MIN_TTL = 1.0  # below this, re-advertisement would flood the DHT
MAX_TTL = 24 * 3600.0  # no record outlives a day without being republished
READVERTISE_FRACTION = 0.8  # republish after 80% of the TTL: 240 s for 300 s
DEFAULT_CACHE_TTL = 60.0  # discovery cache
DEFAULT_CALL_TIMEOUT = 5.0  # per attempt of a service call
DEFAULT_REQUEST_TIMEOUT = 5.0  # one request/reply between two nodes
DEFAULT_CONNECT_TIMEOUT = 5.0  # QUIC + TLS + session handshake
DEFAULT_QUERY_TIMEOUT = 0.5  # one DHT query; a slower peer is skipped by the lookup
MAX_TIMEOUT = 3600.0
DEFAULT_MAX_ATTEMPTS = 3  # providers tried by one call before asking the DHT again
MAX_ATTEMPTS = 100
DEFAULT_K = 20  # Kademlia bucket size and replication factor
MAX_K = 256
DEFAULT_ALPHA = 3  # lookup parallelism
DEFAULT_STRATEGY = "random"

# ------------------------------------------------------------------ sizes
MAX_SERVICE_NAME = 255
MAX_REALM = 255
MAX_NODE_NAME = 64
MAX_ENDPOINT = 256
MAX_HOST = 253  # a DNS name; each label at most 63
MAX_METADATA_BYTES = 4096  # msgpack-encoded

_SEGMENTS = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bad(field: str, message: str) -> InvalidField:
    return InvalidField(f"{field}: {message}", field=field)


# ------------------------------------------------------------------ numbers
def check_seconds(value: Any, field: str, *, low: float, high: float, low_open: bool = False) -> float:
    """A finite number of seconds in [low, high] (``(low, high]`` with ``low_open``)."""
    if not _is_number(value) or not math.isfinite(value):
        raise _bad(field, f"must be a finite number of seconds, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise _bad(field, f"must be {bound} and <= {high:g} seconds, got {value!r}")
    return float(value)


def check_ttl(value: Any, field: str = "ttl") -> float:
    """A record TTL: 1 s .. 24 h."""
    return check_seconds(value, field, low=MIN_TTL, high=MAX_TTL)


def check_timeout(value: Any, field: str = "timeout") -> float:
    """A timeout: more than 0, at most an hour."""
    return check_seconds(value, field, low=0.0, high=MAX_TIMEOUT, low_open=True)


def check_since(value: Any, field: str = "since") -> float:
    """A wall-clock time (seconds since the epoch, or 0): finite and not negative."""
    return check_seconds(value, field, low=0.0, high=1e12)


#: a watch subscription at a replica lasts at most this long unless renewed
MAX_WATCH_LEASE = 120.0
#: events one SERVICE_EVENT may carry (the node batches what piled up while a push was in flight)
MAX_WATCH_BATCH = 256
WATCH_CHANGES = ("stored", "removed", "expired")


def check_watch_lease(value: Any, field: str = "lease") -> float:
    """How long a replica keeps a watch subscription: (0, 120] seconds."""
    return check_seconds(value, field, low=0.0, high=MAX_WATCH_LEASE, low_open=True)


def check_watch_index(value: Any, field: str = "after") -> int:
    """A watch index to resume after: an integer in 0..2**63-1."""
    return check_int(value, field, low=0, high=(1 << 63) - 1)


def check_watch_change(value: Any, field: str = "kind") -> str:
    """What a replica reports of a record: stored, removed or expired."""
    if value not in WATCH_CHANGES:
        raise _bad(field, f"must be one of {', '.join(WATCH_CHANGES)}, got {value!r}")
    return value


def check_watch_batch(value: Any, field: str = "events") -> Any:
    """A batch of watch events: at most MAX_WATCH_BATCH of them (each is checked where it is read)."""
    if len(value) > MAX_WATCH_BATCH:
        raise _bad(field, f"at most {MAX_WATCH_BATCH} events per batch, got {len(value)}")
    return value


def check_cache_ttl(value: Any, field: str = "cache_ttl") -> float:
    """How long discovered providers are cached: 0 (no cache) .. 24 h."""
    return check_seconds(value, field, low=0.0, high=MAX_TTL)


def check_readvertise_fraction(value: Any, field: str = "readvertise_fraction") -> float:
    """When a provider republishes, as a fraction of its TTL: (0, 1), since at 1 the record lapses first."""
    if not _is_number(value) or not math.isfinite(value) or not 0 < value < 1:
        raise _bad(field, f"must be a number with 0 < fraction < 1 of the TTL, got {value!r}")
    return float(value)


def check_int(value: Any, field: str, *, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _bad(field, f"must be an integer in {low}..{high}, got {value!r}")
    return value


def check_attempts(value: Any, field: str = "max_attempts") -> int:
    return check_int(value, field, low=1, high=MAX_ATTEMPTS)


def check_k(value: Any, field: str = "k") -> int:
    return check_int(value, field, low=1, high=MAX_K)


def check_alpha(value: Any, field: str = "alpha") -> int:
    return check_int(value, field, low=1, high=MAX_K)


# ------------------------------------------------------------------ names
def check_realm(value: Any, field: str = "realm") -> str:
    """A realm: reverse-DNS, dot-separated segments of ``[A-Za-z0-9_-]``."""
    if not isinstance(value, str) or len(value) > MAX_REALM or not _SEGMENTS.fullmatch(value):
        raise _bad(
            field,
            f"expected a reverse-DNS name of dot-separated [A-Za-z0-9_-] segments "
            f"(like {DEFAULT_REALM}), got {value!r}",
        )
    return value


def check_service_name(value: Any, field: str = "service") -> str:
    """A service name: dot-separated segments of ``[A-Za-z0-9_-]``, at most 255 characters."""
    if not isinstance(value, str) or len(value) > MAX_SERVICE_NAME or not _SEGMENTS.fullmatch(value):
        raise _bad(
            field,
            f"service names are dot-separated segments of [A-Za-z0-9_-] "
            f"(at most {MAX_SERVICE_NAME} characters), got {value!r}",
        )
    return value


def check_node_name(value: Any, field: str = "name") -> str:
    """A node name: it also names certificate files, so one path component without spaces."""
    if not isinstance(value, str) or len(value) > MAX_NODE_NAME or not _NODE_NAME.fullmatch(value):
        raise _bad(
            field,
            f"expected a name of letters, digits, '.', '_' and '-' (at most {MAX_NODE_NAME} "
            f"characters, starting with a letter or digit), got {value!r}",
        )
    return value


def check_host(host: str, field: str = "endpoint") -> str:
    """A DNS name (labels of 1..63 ``[A-Za-z0-9_-]``), for endpoints a peer will dial."""
    labels = host.rstrip(".").split(".")
    if (
        len(host) > MAX_HOST
        or not all(0 < len(label) <= 63 for label in labels)
        or not all(_SEGMENTS.fullmatch(label) for label in labels)
    ):
        raise _bad(field, f"host {host[:80]!r} is not a valid DNS name (labels of 1-63 [A-Za-z0-9_-])")
    return host


NODE_ID_BYTES = 32


def check_node_id(value: Any, field: str = "node_id") -> bytes:
    """A node id: 32 bytes, or 64 hex characters."""
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise _bad(field, f"must be {NODE_ID_BYTES * 2} hex characters") from None
    if not isinstance(value, bytes | bytearray) or len(value) != NODE_ID_BYTES:
        raise _bad(field, f"must be {NODE_ID_BYTES} bytes")
    return bytes(value)


# ------------------------------------------------------------------ metadata
def check_metadata(value: Any, field: str = "metadata") -> dict[str, Any]:
    """Provider metadata: a map with string keys, at most 4 KiB as msgpack."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(field, f"must be a map, got {type(value).__name__}")
    if not all(isinstance(key, str) for key in value):
        raise _bad(field, "keys must be strings")
    try:
        size = len(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(field, f"is not serialisable: {exc}") from None
    if size > MAX_METADATA_BYTES:
        raise _bad(field, f"is {size} bytes, more than {MAX_METADATA_BYTES}")
    return value
