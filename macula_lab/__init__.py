"""macula-lab: a Jupyter-first lab kit for DHT-based service discovery over QUIC."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CertificateError,
    ConnectFailed,
    ConnectTimeout,
    MaculaError,
    PeerError,
    RealmMismatch,
    RequestTimeout,
)
from .node import Node  # noqa: E402

__all__ = [
    "CertificateError",
    "ConnectFailed",
    "ConnectTimeout",
    "MaculaError",
    "Node",
    "PeerError",
    "RealmMismatch",
    "RequestTimeout",
    "__version__",
]
