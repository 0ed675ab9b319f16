"""Named errors users can act on.

Every error raised by macula_lab derives from :class:`MaculaError`, so a caller
can catch the family, or one precise case.  Codec errors are values the node
answers with (an ERROR frame), never crashes.
"""

from __future__ import annotations


class MaculaError(Exception):
    """Base class of every macula_lab error."""

    #: short machine-readable code carried in ERROR frames
    code = "error"


# --------------------------------------------------------------------- codec
class CodecError(MaculaError):
    """Bytes that are not a valid frame.  Raised by :mod:`macula_lab.core.codec`."""

    code = "bad_frame"


class UnknownVersion(CodecError):
    code = "unknown_version"


class UnknownType(CodecError):
    code = "unknown_type"


class FrameTooLarge(CodecError):
    code = "frame_too_large"


class TruncatedFrame(CodecError):
    """The stream ended in the middle of a frame."""

    code = "truncated_frame"


class MalformedPayload(CodecError):
    """The payload is not one msgpack map."""

    code = "malformed_payload"


class InvalidField(CodecError, ValueError):
    """A value that breaks its rules (see :mod:`macula_lab.core.params`): a wire field or an argument.

    ``field`` names it; it travels in the ERROR frame's details, so a client
    rebuilds the same error.
    """

    code = "invalid_field"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field

    @property
    def details(self) -> dict | None:
        return {"field": self.field} if self.field else None


# ----------------------------------------------------------------- transport
class TransportError(MaculaError):
    """Something went wrong between two nodes."""

    code = "transport_error"


class ConnectTimeout(TransportError):
    """The peer did not complete the QUIC/TLS handshake in time."""

    code = "connect_timeout"


class ConnectFailed(TransportError):
    """The peer could not be reached (bad address, refused, TLS failure...)."""

    code = "connect_failed"


class CertificateError(ConnectFailed):
    """The peer's certificate did not verify against the lab CA."""

    code = "certificate_error"


class Unauthenticated(CertificateError):
    """The peer presented no certificate of the lab CA: nobody knows who it is, so no session."""

    code = "unauthenticated"


class IdentityMismatch(CertificateError):
    """The peer claims an id or an endpoint its certificate does not bind."""

    code = "identity_mismatch"


class RequestTimeout(TransportError):
    """No reply arrived within the request timeout."""

    code = "request_timeout"


class ConnectionClosed(TransportError):
    """The connection closed while a request was waiting for its reply."""

    code = "connection_closed"


class MissingField(InvalidField):
    """A required field is absent (``field`` names it)."""

    code = "missing_field"


class InvalidEndpoint(InvalidField):
    """An endpoint string that cannot be parsed (expected quic://host:port)."""

    def __init__(self, message: str, *, field: str | None = "endpoint"):
        super().__init__(message, field=field)


# ---------------------------------------------------------- session / remote
class RealmMismatch(MaculaError):
    """The peer serves another realm: the session was refused."""

    code = "realm_mismatch"

    def __init__(self, message: str, *, ours: str | None = None, theirs: str | None = None):
        super().__init__(message)
        self.ours = ours
        self.theirs = theirs


class PeerError(MaculaError):
    """The peer answered a request with an ERROR frame.

    ``remote_code`` is the code the peer sent (for example ``unknown_request``
    or one of the codec error codes when our frame was refused).
    """

    code = "peer_error"

    def __init__(self, remote_code: str, message: str, details: dict | None = None):
        super().__init__(f"{remote_code}: {message}")
        self.remote_code = remote_code
        self.remote_message = message
        self.details = details or {}


class HandlerError(MaculaError):
    """A procedure's handler raised; ``details`` carries its type and message.

    The stack trace is included only when the node runs in debug mode.
    """

    code = "handler_error"

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class QuotaExceeded(MaculaError):
    """A peer asked for more than its share (advertisements, records, connections): refused."""

    code = "quota_exceeded"


class ServiceUnavailable(MaculaError):
    """This provider cannot serve the call right now (the caller fails over to another)."""

    code = "service_unavailable"


class NotStarted(MaculaError, RuntimeError):
    """The node (or transport) is not running."""

    code = "not_started"
