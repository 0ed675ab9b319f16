"""macula-lab: a Jupyter-first lab kit for DHT-based service discovery over QUIC."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CertificateError,
    ConnectFailed,
    ConnectTimeout,
    IdentityMismatch,
    InvalidField,
    MaculaError,
    PeerError,
    QuotaExceeded,
    RealmMismatch,
    RequestTimeout,
    Unauthenticated,
)
from .lab.client import Client, connect  # noqa: E402
from .lab.lab import Lab  # noqa: E402
from .runtime.node import Node  # noqa: E402
from .runtime.services import AllProvidersFailed, CallTimeout, RemoteError, ServiceNotFound  # noqa: E402
from .sim import Simulation  # noqa: E402

__all__ = [
    "AllProvidersFailed",
    "CallTimeout",
    "Client",
    "RemoteError",
    "ServiceNotFound",
    "connect",
    "CertificateError",
    "ConnectFailed",
    "ConnectTimeout",
    "IdentityMismatch",
    "InvalidField",
    "MaculaError",
    "QuotaExceeded",
    "Unauthenticated",
    "Lab",
    "Node",
    "Simulation",
    "PeerError",
    "RealmMismatch",
    "RequestTimeout",
    "__version__",
]
