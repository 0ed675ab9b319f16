"""A small lab certificate authority for QUIC/TLS between macula-lab nodes.

One directory holds everything::

    D/ca.pem   D/ca.key          the lab CA (key mode 0600)
    D/<name>.pem  D/<name>.key   one certificate per node or attached client (key mode 0600)

Keys are EC P-256 (fast to generate, so tests can mint certs freely) and
signatures SHA-256.  Every certificate binds an **identity**: the node id, in
a SAN of type otherName (:data:`NODE_ID_OID`, an OCTET STRING of 32 bytes,
which host-name checks ignore; :func:`cert_node_id` reads it back).
A session's CONNECT must claim exactly that id.  Node certificates also name
the hosts the node may claim as its endpoint (DNS and IP SANs, checked by
``service_identity`` like any TLS server name) and are usable as server and
client; a **client** certificate (an attached client: a notebook, a script)
names no host, so its holder can never pose as a node listening somewhere.
Nothing is named by default beyond the node's own name: a certificate valid for
``localhost`` would let its holder claim a loopback endpoint on any machine,
so ask for it (``--dns localhost --ip 127.0.0.1``) where a lab needs it.

The same functions back the ``macula-lab certs`` subcommand (:func:`certs_cli`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import MaculaError

__all__ = [
    "CertsError",
    "NodeCert",
    "cert_node_id",
    "certs_cli",
    "create_ca",
    "describe",
    "ensure_ca",
    "issue_client_cert",
    "issue_node_cert",
    "lab_certs",
    "load_cert",
]

#: the otherName SAN type that binds a certificate to a node id (a UUID-based OID, X.667:
#: no registry needed, and no name or address check misreads it)
NODE_ID_OID = x509.ObjectIdentifier("2.25.300926610800880970047851027260796971112")

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
CERTS_DIR_ENV = "MACULA_CERTS_DIR"
DEFAULT_CERTS_DIR = "certs"

#: certificates start 5 minutes in the past so a peer with a slightly slow
#: clock does not reject a freshly minted cert as "not yet valid"
CLOCK_SKEW = dt.timedelta(minutes=5)

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_MAX_CN = 64  # X.509 upper bound on a commonName (cryptography enforces it)


class CertsError(MaculaError):
    """A lab certificate could not be created, loaded or issued."""

    code = "certs_error"


@dataclass(frozen=True)
class NodeCert:
    """Paths of one certificate, its private key and the CA that signed it; the node id it binds."""

    cert: Path
    key: Path
    ca: Path
    node_id: bytes = b""


# ----------------------------------------------------------------- validation
def _is_dns_name(text: str) -> bool:
    """RFC 1123 host name; a leading ``*.`` wildcard label is allowed."""
    if not text or len(text) > 253 or _is_ip(text):
        return False  # an IP literal in a DNS SAN makes service_identity reject the certificate
    labels = text.split(".")  # no trailing dot: service_identity would never match it
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    return all(_DNS_LABEL_RE.fullmatch(label) for label in labels)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_name(name: str) -> str:
    # the name becomes a file name and the CN, so keep it short and path-safe
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise CertsError(f"invalid node name {name!r}: use only letters, digits, '.', '_' and '-'")
    if name.startswith(".") or len(name) > _MAX_CN:
        raise CertsError(
            f"invalid node name {name!r}: must not start with '.' and be at most {_MAX_CN} chars"
        )
    if name == "ca":
        raise CertsError("node name 'ca' is reserved for the lab CA files")
    return name


def _check_dns(names: Iterable[str]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if isinstance(name, str) and _is_ip(name):
            raise CertsError(f"{name!r} is an IP address, not a DNS name: pass it as an IP (--ip)")
        if not isinstance(name, str) or not _is_dns_name(name):
            raise CertsError(f"invalid DNS name {name!r}")
    return names


def _check_ips(ips: Iterable[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    ips = [ips] if isinstance(ips, str) else list(ips)
    parsed = []
    for ip in ips:
        try:
            parsed.append(ipaddress.ip_address(ip))
        except ValueError:
            raise CertsError(f"invalid IP address {ip!r}") from None
    return parsed


def _check_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise CertsError(f"validity must be a positive number of days, got {days!r}")
    return days


def _unique(items: Iterable) -> list:
    """Drop duplicates, keep first-seen order (SAN lists read nicer that way)."""
    return list(dict.fromkeys(items))


# ------------------------------------------------------------------- file I/O
def _write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Write atomically; private files are created 0600 so a key is never world-readable."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CertsError(f"cannot write {path}: {exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        # mkstemp creates 0600; public certs get the usual umask-style 0644
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CertsError(f"cannot write {path}: {exc}") from None
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca_paths(directory: str | os.PathLike) -> tuple[Path, Path]:
    d = Path(directory)
    return d / CA_CERT_NAME, d / CA_KEY_NAME


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CertsError(f"certificate not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise CertsError(f"cannot read certificate {path}: {exc}") from None


def _load_ca(directory: str | os.PathLike) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    ca_cert_path, ca_key_path = _ca_paths(directory)
    for path in (ca_cert_path, ca_key_path):
        if not path.exists():
            raise CertsError(
                f"lab CA not found: {path} is missing; run `macula-lab certs init --dir {directory}`"
            )
    cert = _load_cert(ca_cert_path)
    try:
        key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertsError(f"cannot read CA key {ca_key_path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertsError(f"CA key {ca_key_path} does not match CA certificate {ca_cert_path}")
    return cert, key, ca_cert_path


# ---------------------------------------------------------------- building
def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cn(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int, not_after_cap: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)
    if not_after_cap is not None:
        # a leaf outliving its CA would only fail later, and confusingly
        not_after = min(not_after, not_after_cap)
    return now - CLOCK_SKEW, not_after


def _ca_certificate(key: ec.EllipticCurvePrivateKey, common_name: str, days: int) -> x509.Certificate:
    not_before, not_after = _validity(days)
    name = _cn(common_name)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # path_length=0: the lab CA signs leaves only, never intermediates
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _node_certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    dns: list[str],
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    days: int,
    node_id: bytes,
    *,
    server: bool = True,
) -> x509.Certificate:
    not_before, not_after = _validity(days, ca_cert.not_valid_after_utc)
    public = key.public_key()
    sans: list[x509.GeneralName] = [x509.OtherName(NODE_ID_OID, b"\x04\x20" + node_id)]  # DER OCTET STRING
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ip) for ip in ips]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_cn(name))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # nodes are both QUIC servers and clients of each other; attached clients only clients
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


# -------------------------------------------------------------------- API
def create_ca(
    directory: str | os.PathLike,
    *,
    common_name: str = "macula-lab CA",
    days: int = 3650,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Create ``D/ca.pem`` and ``D/ca.key``; returns ``(ca_cert, ca_key)``.

    Refuses to replace an existing CA unless ``overwrite`` -- a new CA silently
    invalidates every node certificate already issued from the old one.
    """
    _check_days(days)
    if not isinstance(common_name, str) or not 1 <= len(common_name) <= _MAX_CN:
        raise CertsError(f"CA common name must be 1..{_MAX_CN} characters, got {common_name!r}")
    ca_cert_path, ca_key_path = _ca_paths(directory)
    if not overwrite and (ca_cert_path.exists() or ca_key_path.exists()):
        raise CertsError(
            f"a lab CA already exists in {ca_cert_path.parent}; pass overwrite=True (CLI: --force) "
            "to replace it (certificates issued by the old CA will stop verifying)"
        )
    try:
        ca_cert_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CertsError(f"cannot create certificate directory {ca_cert_path.parent}: {exc}") from None
    key = _new_key()
    cert = _ca_certificate(key, common_name, days)
    # key first: a ca.pem without its key would look like a usable CA
    _write_file(ca_key_path, _key_pem(key), private=True)
    _write_file(ca_cert_path, _cert_pem(cert), private=False)
    return ca_cert_path, ca_key_path


def ensure_ca(directory: str | os.PathLike) -> tuple[Path, Path]:
    """Reuse the CA in ``directory`` if there is one, else create it."""
    ca_cert_path, ca_key_path = _ca_paths(directory)
    if ca_cert_path.exists() or ca_key_path.exists():
        _load_ca(directory)  # half a CA, or an unreadable one, is an error, not a reason to replace it
        return ca_cert_path, ca_key_path
    return create_ca(directory)


def _check_node_id(node_id: bytes | str | None) -> bytes:
    if node_id is None:
        return os.urandom(32)
    if isinstance(node_id, str):
        try:
            node_id = bytes.fromhex(node_id)
        except ValueError:
            raise CertsError(f"node id must be 64 hex characters, got {node_id!r}") from None
    if not isinstance(node_id, bytes | bytearray) or len(node_id) != 32:
        raise CertsError("node id must be 32 bytes (64 hex characters)")
    return bytes(node_id)


def issue_node_cert(
    directory: str | os.PathLike,
    name: str,
    *,
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
    days: int = 825,
    overwrite: bool = True,
    node_id: bytes | str | None = None,
) -> NodeCert:
    """Issue ``D/<name>.pem`` + ``D/<name>.key`` for a node, signed by the lab CA in ``D``.

    The certificate binds ``node_id`` (random unless given) and names ``name``
    itself (as a DNS name, or as an IP address when it is one) plus ``dns`` and
    ``ips``: the hosts this node may claim as its endpoint.
    """
    _check_name(name)
    _check_days(days)
    extra_dns = _check_dns(dns)
    extra_ips = _check_ips(ips)
    node_id = _check_node_id(node_id)
    ca_cert, ca_key, ca_path = _load_ca(directory)
    cert_path, key_path = _leaf_paths(directory, name, overwrite)
    dns_names = _unique(([name] if _is_dns_name(name) else []) + extra_dns)
    own_ip = [ipaddress.ip_address(name)] if _is_ip(name) else []  # a node named by its address
    ip_addrs = _unique(own_ip + extra_ips)
    key = _new_key()
    cert = _node_certificate(name, key, ca_cert, ca_key, dns_names, ip_addrs, days, node_id)
    _write_file(key_path, _key_pem(key), private=True)
    _write_file(cert_path, _cert_pem(cert), private=False)
    return NodeCert(cert=cert_path, key=key_path, ca=ca_path, node_id=node_id)


def issue_client_cert(
    directory: str | os.PathLike,
    name: str,
    *,
    days: int = 825,
    overwrite: bool = True,
    node_id: bytes | str | None = None,
) -> NodeCert:
    """Issue ``D/<name>.pem`` + ``D/<name>.key`` for an attached client (a notebook, a script).

    It binds a node id and names no host: its holder can open sessions, call,
    discover and advertise through a node, but never pose as a node.
    """
    _check_name(name)
    _check_days(days)
    node_id = _check_node_id(node_id)
    ca_cert, ca_key, ca_path = _load_ca(directory)
    cert_path, key_path = _leaf_paths(directory, name, overwrite)
    key = _new_key()
    cert = _node_certificate(name, key, ca_cert, ca_key, [], [], days, node_id, server=False)
    _write_file(key_path, _key_pem(key), private=True)
    _write_file(cert_path, _cert_pem(cert), private=False)
    return NodeCert(cert=cert_path, key=key_path, ca=ca_path, node_id=node_id)


def _leaf_paths(directory: str | os.PathLike, name: str, overwrite: bool) -> tuple[Path, Path]:
    cert_path = Path(directory) / f"{name}.pem"
    key_path = Path(directory) / f"{name}.key"
    if not overwrite and (cert_path.exists() or key_path.exists()):
        raise CertsError(f"certificate for {name!r} already exists in {cert_path.parent}; pass overwrite=True")
    return cert_path, key_path


def cert_node_id(cert: x509.Certificate) -> bytes | None:
    """The node id a certificate binds (its :data:`NODE_ID_OID` otherName SAN), or None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == NODE_ID_OID:
            value = other.value
            # a DER OCTET STRING of exactly 32 bytes: tag 0x04, length 0x20
            return value[2:] if len(value) == 34 and value[:2] == b"\x04\x20" else None
    return None


def load_cert(path: str | os.PathLike) -> x509.Certificate:
    """A PEM certificate from ``path`` (CertsError naming the file if it cannot be read)."""
    return _load_cert(Path(path))


def lab_certs(
    directory: str | os.PathLike,
    names: Iterable[str],
    *,
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
) -> dict[str, NodeCert]:
    """Ensure a CA in ``directory`` and issue one node certificate per name (each with ``dns``/``ips``)."""
    names = [names] if isinstance(names, str) else list(names)
    dns, ips = list(dns), list(ips)  # reused for every name, so no one-shot iterators
    for name in names:
        _check_name(name)  # fail before writing anything
    ensure_ca(directory)
    return {name: issue_node_cert(directory, name, dns=dns, ips=ips) for name in names}


def _first_cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def describe(cert_path: str | os.PathLike) -> dict:
    """A plain-dict summary of a certificate (for notebooks and ``certs show``)."""
    cert = _load_cert(Path(cert_path))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns, ips = [], []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    node_id = cert_node_id(cert)
    return {
        "path": str(cert_path),
        "node_id": node_id.hex() if node_id else None,
        "subject": _first_cn(cert.subject),
        "issuer": _first_cn(cert.issuer),
        "serial": format(cert.serial_number, "x"),
        "is_ca": is_ca,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "dns": dns,
        "ips": ips,
        "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


# -------------------------------------------------------------------- CLI
def _default_dir() -> str:
    # read at call time so tests (and notebooks) can set the variable late
    return os.environ.get(CERTS_DIR_ENV) or DEFAULT_CERTS_DIR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macula-lab certs", description="Manage the lab certificate authority."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{init,issue,issue-client,show}")
    dir_help = f"certificate directory (default: ${CERTS_DIR_ENV} or ./{DEFAULT_CERTS_DIR})"

    init = sub.add_parser("init", help="create the lab CA (ca.pem, ca.key)")
    init.add_argument("--dir", default=None, help=dir_help)
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default: 3650)")
    init.add_argument("--cn", default="macula-lab CA", help="CA common name")

    issue = sub.add_parser("issue", help="issue a node certificate signed by the lab CA")
    issue.add_argument("name", help="node name (file name and CN)")
    issue.add_argument("--dir", default=None, help=dir_help)
    issue.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the node may claim as its endpoint (repeatable)",
    )
    issue.add_argument(
        "--ip", action="append", default=[], metavar="ADDR", help="an address the node may claim (repeatable)"
    )
    issue.add_argument("--days", type=int, default=825, help="validity in days (default: 825)")
    issue.add_argument("--node-id", default=None, metavar="HEX", help="the node id to bind (default: random)")

    client = sub.add_parser(
        "issue-client", help="issue a certificate for an attached client (a notebook or script, not a node)"
    )
    client.add_argument("name", help="client name (file name and CN), e.g. lab")
    client.add_argument("--dir", default=None, help=dir_help)
    client.add_argument("--days", type=int, default=825, help="validity in days (default: 825)")
    client.add_argument("--node-id", default=None, metavar="HEX", help="the id to bind (default: random)")

    show = sub.add_parser("show", help="describe a certificate")
    show.add_argument("path", help="PEM certificate file")
    show.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "init":
        cert, key = create_ca(
            args.dir or _default_dir(), common_name=args.cn, days=args.days, overwrite=args.force
        )
        print(f"wrote CA {cert} and key {key}")
    elif args.command == "issue":
        node = issue_node_cert(
            args.dir or _default_dir(), args.name, dns=args.dns, ips=args.ip, days=args.days, node_id=args.node_id
        )
        print(f"wrote {node.cert} and {node.key} (CA {node.ca}, node id {node.node_id.hex()})")
    elif args.command == "issue-client":
        node = issue_client_cert(args.dir or _default_dir(), args.name, days=args.days, node_id=args.node_id)
        print(f"wrote client certificate {node.cert} and {node.key} (CA {node.ca}, id {node.node_id.hex()})")
    else:
        info = describe(args.path)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for field, value in info.items():
                shown = ", ".join(value) if isinstance(value, list) else value
                print(f"{field:>18}: {shown}")


def certs_cli(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``macula-lab certs``; returns the process exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage / help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        _run(args)
    except CertsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(certs_cli())
