"""Message types and their fields (the protocol's vocabulary, no I/O).

Type codes keep the reference system's numbers where the concept is the same
(CONNECT 0x01, PING 0x03, PONG 0x04, CALL 0x20, REPLY 0x21, FIND_NODE 0x40 ...)
and add codes for what the reference lacked: an explicit CONNECT_ACK, a generic
ERROR reply, replies to STORE and a REMOVE message.  Codes the reference only
reserved (pub/sub 0x10-0x12, CAST 0x22, RPC_ROUTE 0x23, SWIM 0x30-0x32) are not
defined here: we never emit a type that the decoder does not know.

Every message carries ``id`` (16 random bytes).  A reply echoes the id of its
request; replies are matched by id, never by arrival order.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import Any, NamedTuple

from ..errors import InvalidField, MissingField
from . import entropy, params
from .endpoint import check_endpoint
from .selection import check_strategy

PROTOCOL_VERSION = 1
ID_SIZE = 16
NODE_ID_SIZE = 32


class MessageType(IntEnum):
    CONNECT = 0x01
    DISCONNECT = 0x02
    PING = 0x03
    PONG = 0x04
    CONNECT_ACK = 0x05  # new: the reference acknowledged with an incidental PONG
    ERROR = 0x06  # new: the reference had no error frame (closed silently)
    CALL = 0x20
    REPLY = 0x21
    # attached clients (new): a client process asks the node it is attached to
    ADVERTISE = 0x24
    ADVERTISE_REPLY = 0x25
    UNADVERTISE = 0x26
    UNADVERTISE_REPLY = 0x27
    DISCOVER = 0x28
    DISCOVER_REPLY = 0x29
    SERVICE_CALL = 0x2A  # "call this service through the mesh for me"
    SERVICE_REPLY = 0x2B
    SERVICE_WATCH = 0x2C  # "watch this service for me": the node runs the watch and relays its events
    SERVICE_WATCH_REPLY = 0x2D
    SERVICE_EVENT = 0x2E  # node -> attached client, over the client's session
    SERVICE_EVENT_REPLY = 0x2F
    FIND_NODE = 0x40
    FIND_NODE_REPLY = 0x41
    STORE = 0x42
    FIND_VALUE = 0x43
    FIND_VALUE_REPLY = 0x44
    STORE_REPLY = 0x45  # new: the reference's STORE had no reply
    REMOVE = 0x46  # new: the reference could not delete remotely
    REMOVE_REPLY = 0x47
    WATCH = 0x48  # new: subscribe at a replica to changes of a key's provider set (a lease)
    WATCH_REPLY = 0x49
    WATCH_EVENT = 0x4A  # new: replica -> subscriber, a key's provider set changed
    WATCH_EVENT_REPLY = 0x4B
    # lab inspection (new): what the views show, only for holders of the admin token
    INSPECT = 0x50
    INSPECT_REPLY = 0x51


#: request type -> the reply type that answers it (ERROR may answer any request)
REPLY_TO: dict[MessageType, MessageType] = {
    MessageType.CONNECT: MessageType.CONNECT_ACK,
    MessageType.PING: MessageType.PONG,
    MessageType.CALL: MessageType.REPLY,
    MessageType.ADVERTISE: MessageType.ADVERTISE_REPLY,
    MessageType.UNADVERTISE: MessageType.UNADVERTISE_REPLY,
    MessageType.DISCOVER: MessageType.DISCOVER_REPLY,
    MessageType.SERVICE_CALL: MessageType.SERVICE_REPLY,
    MessageType.SERVICE_WATCH: MessageType.SERVICE_WATCH_REPLY,
    MessageType.SERVICE_EVENT: MessageType.SERVICE_EVENT_REPLY,
    MessageType.FIND_NODE: MessageType.FIND_NODE_REPLY,
    MessageType.FIND_VALUE: MessageType.FIND_VALUE_REPLY,
    MessageType.STORE: MessageType.STORE_REPLY,
    MessageType.REMOVE: MessageType.REMOVE_REPLY,
    MessageType.WATCH: MessageType.WATCH_REPLY,
    MessageType.WATCH_EVENT: MessageType.WATCH_EVENT_REPLY,
    MessageType.INSPECT: MessageType.INSPECT_REPLY,
}
REPLY_TYPES = frozenset(REPLY_TO.values()) | {MessageType.ERROR}


class Frame(NamedTuple):
    """One decoded message: its type and its body (a dict with str keys)."""

    type: MessageType
    body: dict[str, Any]

    @property
    def id(self) -> bytes:
        return self.body["id"]


class Field(NamedTuple):
    types: tuple[type, ...] | None  # None: any msgpack value
    required: bool = True
    size: int | None = None  # exact length for bytes
    #: the value's rule (a check of :mod:`.params`, called with the value and the field
    #: name; returns the value, maybe normalised, or raises InvalidField)
    check: Callable[[Any, str], Any] | None = None


ANY = Field(None)
REQ_ID = Field((bytes,), size=ID_SIZE)
NODE_ID = Field((bytes,), size=NODE_ID_SIZE)
STR = Field((str,))
INT = Field((int,))
LIST = Field((list, tuple))
MAP = Field((dict,))
BOOL = Field((bool,))


def optional(f: Field) -> Field:
    return f._replace(required=False)


def checked(f: Field, check: Callable[[Any, str], Any], *, allow_empty: bool = False) -> Field:
    """``f`` whose value must also pass ``check`` (``""`` passes too with ``allow_empty``)."""
    if allow_empty:
        inner = check

        def check(value: Any, field: str) -> Any:
            return value if value == "" else inner(value, field)

    return f._replace(check=check)


SECONDS = Field((int, float))
SERVICE = checked(STR, params.check_service_name)


SCHEMAS: dict[MessageType, dict[str, Field]] = {
    MessageType.CONNECT: {
        "id": REQ_ID,
        "version": INT,
        "node_id": NODE_ID,
        "realm": checked(STR, params.check_realm),
        "capabilities": LIST,
        # where the sender listens ("" for pure clients)
        "endpoint": optional(checked(STR, check_endpoint, allow_empty=True)),
        "name": optional(checked(STR, params.check_node_name, allow_empty=True)),
    },
    MessageType.CONNECT_ACK: {
        "id": REQ_ID,
        "node_id": NODE_ID,
        "realm": STR,
        "capabilities": LIST,
        "name": optional(STR),
        "server_time": optional(Field((int, float))),
    },
    MessageType.DISCONNECT: {"id": REQ_ID, "reason": STR},
    MessageType.ERROR: {
        "id": REQ_ID,
        "code": STR,
        "message": STR,
        "details": optional(MAP),
    },
    MessageType.PING: {"id": REQ_ID},
    MessageType.PONG: {"id": REQ_ID},
    MessageType.CALL: {"id": REQ_ID, "procedure": STR, "args": ANY},
    MessageType.REPLY: {"id": REQ_ID, "result": ANY},
    MessageType.ADVERTISE: {
        "id": REQ_ID,
        "service": SERVICE,
        "ttl": checked(SECONDS, params.check_ttl),
        "metadata": checked(MAP, params.check_metadata),
    },
    MessageType.ADVERTISE_REPLY: {"id": REQ_ID, "replicas": INT},
    MessageType.UNADVERTISE: {"id": REQ_ID, "service": SERVICE},
    MessageType.UNADVERTISE_REPLY: {"id": REQ_ID, "removed": INT},
    MessageType.DISCOVER: {"id": REQ_ID, "service": SERVICE, "refresh": BOOL},
    MessageType.DISCOVER_REPLY: {"id": REQ_ID, "providers": LIST},
    MessageType.SERVICE_CALL: {
        "id": REQ_ID,
        "service": SERVICE,
        "args": ANY,
        "timeout": checked(SECONDS, params.check_timeout),
        "strategy": optional(checked(STR, check_strategy)),
        "max_attempts": optional(checked(INT, params.check_attempts)),
    },
    MessageType.SERVICE_REPLY: {
        "id": REQ_ID,
        "result": ANY,
        "provider": STR,
        "node_id": STR,
        "latency": Field((int, float)),
    },
    MessageType.SERVICE_WATCH: {
        "id": REQ_ID,
        "service": SERVICE,
        # chosen by the client, so events that overtake this reply find their watch
        "watch": checked(INT, params.check_watch_index),
        "after": optional(checked(INT, params.check_watch_index)),  # resume after this index
    },
    MessageType.SERVICE_WATCH_REPLY: {"id": REQ_ID, "watch": INT},
    MessageType.SERVICE_EVENT: {
        "id": REQ_ID,
        "watch": INT,
        "events": checked(LIST, params.check_watch_batch),
    },
    MessageType.SERVICE_EVENT_REPLY: {"id": REQ_ID, "ok": BOOL},
    MessageType.FIND_NODE: {"id": REQ_ID, "target": NODE_ID},
    MessageType.FIND_NODE_REPLY: {"id": REQ_ID, "nodes": LIST},
    MessageType.FIND_VALUE: {"id": REQ_ID, "key": NODE_ID, "all": optional(BOOL)},  # all: contacts too
    MessageType.FIND_VALUE_REPLY: {
        "id": REQ_ID,
        "nodes": LIST,
        "value": optional(LIST),
    },
    MessageType.STORE: {"id": REQ_ID, "key": NODE_ID, "value": MAP},
    MessageType.STORE_REPLY: {"id": REQ_ID, "stored": BOOL},
    MessageType.REMOVE: {"id": REQ_ID, "key": NODE_ID, "provider": NODE_ID},
    MessageType.REMOVE_REPLY: {"id": REQ_ID, "removed": BOOL},
    MessageType.WATCH: {"id": REQ_ID, "key": NODE_ID, "lease": checked(SECONDS, params.check_watch_lease)},
    # removed: [provider, seq] of the advertisements this replica saw removed (its tombstones)
    MessageType.WATCH_REPLY: {"id": REQ_ID, "lease": SECONDS, "value": LIST, "removed": optional(LIST)},
    MessageType.WATCH_EVENT: {
        "id": REQ_ID,
        "key": NODE_ID,
        "kind": checked(STR, params.check_watch_change),
        "value": MAP,
    },
    MessageType.WATCH_EVENT_REPLY: {"id": REQ_ID, "ok": BOOL},
    MessageType.INSPECT: {
        "id": REQ_ID,
        "token": STR,
        "sections": LIST,
        "since": optional(checked(SECONDS, params.check_since)),
    },
    MessageType.INSPECT_REPLY: {"id": REQ_ID, "snapshot": MAP},
}


def new_id() -> bytes:
    """A fresh random request id (the reference used colliding counters)."""
    return entropy.randbytes(ID_SIZE)


def validate(mtype: MessageType, body: Any) -> dict[str, Any]:
    """Check ``body`` against the schema of ``mtype``; return it unchanged.

    Raises :class:`MissingField` or :class:`InvalidField`.  Extra fields are
    allowed so that newer peers can add information.
    """
    # Fast path (runs on every frame sent and received): a plain dict whose fields
    # all have exactly one of the allowed types.  Anything else -- a missing or
    # mistyped field, a subclass value -- takes the full check, which decides and
    # words the error.  Then the value rules of the fields that have one.
    if body.__class__ is dict:
        for name, required, exact, size in _COMPILED[mtype]:
            value = body.get(name, _ABSENT)
            if value is _ABSENT:
                if required:
                    break
            elif exact is not None and (
                value.__class__ not in exact or (size is not None and len(value) != size)
            ):
                break
        else:
            return _apply_checks(mtype, body)
    return _apply_checks(mtype, _validate_fully(mtype, body))


def _apply_checks(mtype: MessageType, body: dict[str, Any]) -> dict[str, Any]:
    for name, check in _CHECKED[mtype]:
        if name in body:
            try:
                body[name] = check(body[name], name)
            except InvalidField as exc:
                raise InvalidField(f"{mtype.name}.{exc}", field=name) from None
    return body


def _validate_fully(mtype: MessageType, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidField(f"{mtype.name} body must be a map, got {type(body).__name__}")
    for name, spec in SCHEMAS[mtype].items():
        if name not in body:
            if spec.required:
                raise MissingField(f"{mtype.name} lacks field {name!r}", field=name)
            continue
        value = body[name]
        if spec.types is None:
            continue
        if not isinstance(value, spec.types) or (isinstance(value, bool) and bool not in spec.types):
            raise InvalidField(
                f"{mtype.name}.{name} must be {'/'.join(t.__name__ for t in spec.types)}, "
                f"got {type(value).__name__}",
                field=name,
            )
        if spec.size is not None and len(value) != spec.size:
            raise InvalidField(f"{mtype.name}.{name} must be {spec.size} bytes, got {len(value)}", field=name)
    return body


_ABSENT = object()
#: (field, check) of the fields with a value rule, per type (most types have none)
_CHECKED: dict[MessageType, tuple[tuple[str, Callable[[Any, str], Any]], ...]] = {
    mtype: tuple((name, f.check) for name, f in schema.items() if f.check is not None)
    for mtype, schema in SCHEMAS.items()
}
#: SCHEMAS flattened for validate()'s fast path: (name, required, exact types or
#: None for "any", exact size or None) per field.  Derived once: SCHEMAS is fixed.
_COMPILED: dict[MessageType, tuple[tuple[str, bool, frozenset[type] | None, int | None], ...]] = {
    mtype: tuple(
        (name, f.required, None if f.types is None else frozenset(f.types), f.size)
        for name, f in schema.items()
    )
    for mtype, schema in SCHEMAS.items()
}
