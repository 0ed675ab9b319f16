"""Checks of peer certificates against the lab CA, each done once per process.

A QUIC handshake with mutual TLS verifies a certificate chain on both sides
(and the server's host name, and the host a client claims as its endpoint).
aioquic does each check from scratch (a fresh OpenSSL store, every certificate
parsed again): about 1.5 ms of CPU per check, three per connection.  In a lab
the same few certificates meet over and over (60 nodes in one kernel each dial
dozens of the others), so a successful check is remembered, per process, by
(certificate, name, CA): later connections pay a dictionary lookup and a clock
comparison (a certificate that expires drops out).  Failures are never
remembered: a bad certificate is checked, and refused, every time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import OrderedDict
from typing import Any

from aioquic.tls import verify_certificate
from cryptography.hazmat.primitives import hashes

MAX_ENTRIES = 8192

_verified: OrderedDict[tuple[bytes, str | None, bytes], dt.datetime] = OrderedDict()


class TrustedCA:
    """The lab CA a transport verifies peers against (its PEM bytes, and their digest for the cache)."""

    __slots__ = ("cadata", "digest")

    def __init__(self, cadata: bytes):
        self.cadata = cadata
        self.digest = hashlib.sha256(cadata).digest()


def verify_peer(cert: Any, chain: list[Any], *, ca: TrustedCA, server_name: str | None = None) -> None:
    """Raise (aioquic's TLS alert) unless ``cert`` chains to ``ca`` and names ``server_name``.

    ``server_name`` None checks the chain only.  Remembered per process on success.
    """
    key = (cert.fingerprint(hashes.SHA256()), server_name, ca.digest)
    now = dt.datetime.now(dt.UTC)
    not_after = _verified.get(key)
    if not_after is not None and now <= not_after:
        _verified.move_to_end(key)
        return
    verify_certificate(certificate=cert, chain=chain, server_name=server_name, cadata=ca.cadata)
    _verified[key] = cert.not_valid_after_utc
    if len(_verified) > MAX_ENTRIES:
        _verified.popitem(last=False)


def forget() -> None:
    """Drop every remembered check (tests; a CA that was replaced)."""
    _verified.clear()
