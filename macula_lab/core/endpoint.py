"""Endpoint strings: ``quic://host:port`` (also ``https://``) and ``mem://name``.

Endpoints travel on the wire as strings (the reference put Erlang address tuples
in routing replies and crashed serialising them).  The port is always explicit
when formatting; when parsing a URL without a port, 9443 is assumed on every
side (the reference defaulted to 443 on clients and 9443 on gateways).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import urlsplit

from ..errors import InvalidEndpoint
from .params import MAX_ENDPOINT, check_host, check_node_name

DEFAULT_PORT = 9443
QUIC_SCHEMES = ("quic", "https", "macula")


class Endpoint(NamedTuple):
    scheme: str  # "quic" or "mem"
    host: str  # host name, IP literal (no brackets) or memory node name
    port: int  # 0 for mem

    def __str__(self) -> str:
        if self.scheme == "mem":
            return f"mem://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"quic://{host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_endpoint(text: str) -> Endpoint:
    """Parse an endpoint string; raises :class:`InvalidEndpoint` with the reason."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidEndpoint(f"empty endpoint {text!r}")
    if len(text) > MAX_ENDPOINT:
        raise InvalidEndpoint(f"endpoint is {len(text)} characters, more than {MAX_ENDPOINT}")
    text = text.strip()
    if "://" not in text:
        text = "quic://" + text  # "host:port" shorthand
    try:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme == "mem":
            name = parts.netloc or parts.path.lstrip("/")
            if not name:
                raise InvalidEndpoint(f"memory endpoint without a name: {text!r}")
            try:
                check_node_name(name)
            except ValueError as exc:
                raise InvalidEndpoint(f"bad memory endpoint {text!r}: {exc}") from None
            return Endpoint("mem", name, 0)
        if scheme not in QUIC_SCHEMES:
            raise InvalidEndpoint(f"unsupported scheme {scheme!r} in {text!r} (use quic://host:port)")
        host = parts.hostname
        port = parts.port
    except ValueError as exc:  # bad port, bad IPv6 literal
        raise InvalidEndpoint(f"cannot parse endpoint {text!r}: {exc}") from None
    if not host:
        raise InvalidEndpoint(f"endpoint without a host: {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidEndpoint(f"endpoint must be scheme://host:port, got {text!r}")
    ep = Endpoint("quic", host, DEFAULT_PORT if port is None else port)
    if not ep.is_ip:  # a name a peer will resolve: one that cannot be encoded would fail every dial
        try:
            check_host(host)
        except ValueError as exc:
            raise InvalidEndpoint(f"bad endpoint {text[:80]!r}: {exc}") from None
    return ep


def check_endpoint(value: object, field: str = "endpoint") -> str:
    """A valid endpoint (the canonical string form), or :class:`InvalidEndpoint` naming ``field``.

    Cached: every contact in every DHT reply is checked, and a node meets a bounded set of peers.
    """
    if not isinstance(value, str):
        raise InvalidEndpoint(f"{field}: must be text, got {type(value).__name__}", field=field)
    canonical, problem = _canonical(value)
    if problem:
        raise InvalidEndpoint(f"{field}: {problem}", field=field)
    return canonical


@lru_cache(maxsize=4096)
def _canonical(text: str) -> tuple[str, str]:
    try:
        return str(parse_endpoint(text)), ""
    except InvalidEndpoint as exc:
        return "", str(exc)


@lru_cache(maxsize=4096)
def normalize_endpoint(text: str) -> str:
    """The canonical string form (``quic://host:port``), used as a pool key.

    Cached: it runs on every request, and a node talks to a bounded set of peers.
    """
    return str(parse_endpoint(text))


def parse_host_port(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """Parse ``host:port``, ``[v6]:port``, ``:port`` or ``port``; raises ValueError."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 address must be in brackets: {text!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected host:port with a port 0-65535, got {text!r}")
    return host or default_host, int(port_text)
