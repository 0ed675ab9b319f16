"""Tests of the lab CA (:mod:`macula_lab.transport.certs`), including acceptance by aioquic."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from macula_lab.errors import MaculaError
from macula_lab.transport.certs import (
    CertsError,
    NodeCert,
    cert_node_id,
    certs_cli,
    create_ca,
    describe,
    ensure_ca,
    issue_client_cert,
    issue_node_cert,
    lab_certs,
)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    create_ca(d)
    return d


# ------------------------------------------------------------------------ CA
def test_create_ca_layout_and_extensions(tmp_path: Path) -> None:
    d = tmp_path / "new" / "dir"  # missing parents are created
    cert_path, key_path = create_ca(d, common_name="Test CA")
    assert (cert_path, key_path) == (d / "ca.pem", d / "ca.key")
    assert mode(key_path) == 0o600

    cert = load(cert_path)
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=Test CA"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.signature_hash_algorithm.name == "sha256"

    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    # backdated for clock skew
    now = dt.datetime.now(dt.UTC)
    assert now - dt.timedelta(minutes=6) < cert.not_valid_before_utc < now - dt.timedelta(minutes=4)
    info = describe(cert_path)
    assert info["is_ca"] and info["subject"] == info["issuer"] == "Test CA"


def test_create_ca_refuses_to_overwrite(ca_dir: Path) -> None:
    before = (ca_dir / "ca.pem").read_bytes()
    with pytest.raises(CertsError, match="--force") as info:
        create_ca(ca_dir)
    assert "overwrite" in str(info.value)
    assert (ca_dir / "ca.pem").read_bytes() == before

    create_ca(ca_dir, overwrite=True)
    assert (ca_dir / "ca.pem").read_bytes() != before


def test_ensure_ca_reuses_existing(tmp_path: Path) -> None:
    first = ensure_ca(tmp_path)
    pem = first[0].read_bytes()
    assert ensure_ca(tmp_path) == first
    assert first[0].read_bytes() == pem


def test_ensure_ca_refuses_half_a_ca(tmp_path: Path) -> None:
    create_ca(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(CertsError, match="ca.key"):
        ensure_ca(tmp_path)


def test_certs_error_is_a_macula_error() -> None:
    assert issubclass(CertsError, MaculaError)
    assert CertsError.code == "certs_error"


# ---------------------------------------------------------------- node certs
def test_issue_node_cert_sans_and_extensions(ca_dir: Path) -> None:
    node = issue_node_cert(ca_dir, "node1", dns=["node1.lab", "node1"], ips=["10.0.0.7", "10.0.0.7"])
    assert node == NodeCert(
        cert=ca_dir / "node1.pem", key=ca_dir / "node1.key", ca=ca_dir / "ca.pem", node_id=node.node_id
    )
    assert mode(node.key) == 0o600 and len(node.node_id) == 32

    cert = load(node.cert)
    assert cert.subject.rfc4514_string() == "CN=node1"
    assert cert.issuer == load(node.ca).subject
    assert cert_node_id(cert) == node.node_id  # the identity it binds
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # the name itself and what was asked for, nothing more (no localhost); duplicates dropped, order kept
    assert san.get_values_for_type(x509.DNSName) == ["node1", "node1.lab"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]

    ext = cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ext.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH}
    ca_ski = load(node.ca).extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    akid = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert akid.key_identifier == ca_ski.digest
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_name_that_is_not_a_dns_label_is_not_a_san(ca_dir: Path) -> None:
    info = describe(issue_node_cert(ca_dir, "node_1").cert)
    assert info["subject"] == "node_1"
    assert info["dns"] == []


def test_node_named_by_its_ip_gets_an_ip_san_that_verifies(ca_dir: Path) -> None:
    # an IP literal in a DNS SAN made service_identity reject the whole certificate
    node = issue_node_cert(ca_dir, "172.20.0.11")
    info = describe(node.cert)
    assert info["dns"] == [] and info["ips"] == ["172.20.0.11"]
    tls.verify_certificate(load(node.cert), chain=[], server_name="172.20.0.11", cafile=str(node.ca))
    with pytest.raises(CertsError, match="IP address"):
        issue_node_cert(ca_dir, "n", dns=["10.0.0.1"])


def test_issue_without_ca_says_run_init(tmp_path: Path) -> None:
    with pytest.raises(CertsError, match="macula-lab certs init") as info:
        issue_node_cert(tmp_path, "node1")
    assert str(tmp_path / "ca.pem") in str(info.value)


@pytest.mark.parametrize("name", ["", "bad name", "../evil", "a/b", "ca", ".hidden", "x" * 65, "nöde"])
def test_bad_names_are_refused(ca_dir: Path, name: str) -> None:
    with pytest.raises(CertsError):
        issue_node_cert(ca_dir, name)


@pytest.mark.parametrize("ip", ["", "300.1.1.1", "localhost", "10.0.0.0/8"])
def test_bad_ips_are_refused(ca_dir: Path, ip: str) -> None:
    with pytest.raises(CertsError, match="IP"):
        issue_node_cert(ca_dir, "node1", ips=[ip])
    assert not (ca_dir / "node1.pem").exists()


@pytest.mark.parametrize("dns", ["", "-bad.lab", "bad_.lab", "a..b", "x" * 64 + ".lab", "sp ace", "a.lab."])
def test_bad_dns_names_are_refused(ca_dir: Path, dns: str) -> None:
    with pytest.raises(CertsError, match="DNS"):
        issue_node_cert(ca_dir, "node1", dns=[dns])


def test_bad_days_are_refused(ca_dir: Path) -> None:
    with pytest.raises(CertsError, match="days"):
        issue_node_cert(ca_dir, "node1", days=0)


def test_issue_overwrite_false_keeps_existing(ca_dir: Path) -> None:
    node = issue_node_cert(ca_dir, "node1")
    with pytest.raises(CertsError, match="already exists"):
        issue_node_cert(ca_dir, "node1", overwrite=False)
    again = issue_node_cert(ca_dir, "node1", node_id=node.node_id)  # default overwrites
    assert (again.cert, again.key, again.node_id) == (node.cert, node.key, node.node_id)


def test_leaf_never_outlives_its_ca(tmp_path: Path) -> None:
    create_ca(tmp_path, days=10)
    node = issue_node_cert(tmp_path, "node1", days=825)
    assert load(node.cert).not_valid_after_utc <= load(node.ca).not_valid_after_utc


def test_lab_certs_issues_one_per_name(tmp_path: Path) -> None:
    certs = lab_certs(tmp_path, ["a", "b", "c"], ips=["192.0.2.1"])
    assert list(certs) == ["a", "b", "c"]
    for name, node in certs.items():
        info = describe(node.cert)
        assert info["subject"] == name and "192.0.2.1" in info["ips"]
        assert node.ca == tmp_path / "ca.pem"
    # the CA is reused, not replaced
    ca_pem = (tmp_path / "ca.pem").read_bytes()
    lab_certs(tmp_path, ["d"])
    assert (tmp_path / "ca.pem").read_bytes() == ca_pem


def test_describe(ca_dir: Path) -> None:
    node = issue_node_cert(ca_dir, "node1", dns=["n1.lab"], ips=["::2"])
    info = describe(node.cert)
    assert info["subject"] == "node1" and info["issuer"] == "macula-lab CA" and not info["is_ca"]
    assert info["node_id"] == node.node_id.hex()
    assert info["dns"] == ["node1", "n1.lab"]
    assert info["ips"] == ["::2"]
    assert len(info["fingerprint_sha256"]) == 64
    assert info["not_before"] < info["not_after"]
    json.dumps(info)  # plain data only

    with pytest.raises(CertsError, match="not found"):
        describe(ca_dir / "missing.pem")
    (ca_dir / "junk.pem").write_text("not a certificate")
    with pytest.raises(CertsError, match="cannot read"):
        describe(ca_dir / "junk.pem")


# ------------------------------------------------------ aioquic verification
@pytest.mark.parametrize("server_name", ["127.0.0.1", "::1", "localhost", "node1", "node1.lab", "10.1.2.3"])
def test_aioquic_accepts_our_certs(ca_dir: Path, server_name: str) -> None:
    node = issue_node_cert(
        ca_dir, "node1", dns=["node1.lab", "localhost"], ips=["10.1.2.3", "127.0.0.1", "::1"]
    )
    tls.verify_certificate(load(node.cert), chain=[], server_name=server_name, cafile=str(node.ca))
    tls.verify_certificate(load(node.cert), chain=[], server_name=server_name, cadata=node.ca.read_bytes())


def test_aioquic_rejects_cert_from_another_ca(tmp_path: Path) -> None:
    ours = lab_certs(tmp_path / "ours", ["node1"], ips=["127.0.0.1"])["node1"]
    theirs = lab_certs(tmp_path / "theirs", ["node1"], ips=["127.0.0.1"])["node1"]
    with pytest.raises(tls.AlertBadCertificate):
        tls.verify_certificate(load(theirs.cert), chain=[], server_name="127.0.0.1", cafile=str(ours.ca))


@pytest.mark.parametrize("server_name", ["other.lab", "10.9.9.9", "node2", "localhost", "127.0.0.1", "::1"])
def test_aioquic_rejects_wrong_hostname(ca_dir: Path, server_name: str) -> None:
    """Loopback is not named unless asked for: a node certificate valid for localhost would
    let its holder claim a loopback endpoint anywhere."""
    node = issue_node_cert(ca_dir, "node1")
    with pytest.raises(tls.AlertBadCertificate, match="doesn't match"):
        tls.verify_certificate(load(node.cert), chain=[], server_name=server_name, cafile=str(node.ca))


def _handshake(server: NodeCert, cafile: Path, server_name: str) -> bool:
    """Run a QUIC handshake in memory (no sockets); True if the client completed it."""
    client_cfg = QuicConfiguration(is_client=True, alpn_protocols=["macula"], server_name=server_name)
    client_cfg.load_verify_locations(cafile=str(cafile))
    server_cfg = QuicConfiguration(is_client=False, alpn_protocols=["macula"])
    server_cfg.load_cert_chain(str(server.cert), str(server.key))
    client = QuicConnection(configuration=client_cfg)
    client_addr, server_addr, now = ("10.0.0.1", 1234), ("10.0.0.2", 4433), 0.0
    client.connect(server_addr, now=now)
    server_conn: QuicConnection | None = None  # created on the first datagram, as a real server would
    for _ in range(20):
        for data, _addr in client.datagrams_to_send(now=now):
            if server_conn is None:
                server_conn = QuicConnection(
                    configuration=server_cfg,
                    original_destination_connection_id=client.original_destination_connection_id,
                )
            server_conn.receive_datagram(data, client_addr, now=now)
        if server_conn is not None:
            for data, _addr in server_conn.datagrams_to_send(now=now):
                client.receive_datagram(data, server_addr, now=now)
        while (event := client.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                return True
    return False


def test_quic_handshake_with_lab_certs(tmp_path: Path) -> None:
    certs = lab_certs(tmp_path, ["server"], ips=["127.0.0.1"])
    assert _handshake(certs["server"], certs["server"].ca, "127.0.0.1")
    assert _handshake(certs["server"], certs["server"].ca, "server")


def test_quic_handshake_fails_with_other_ca(tmp_path: Path) -> None:
    server = lab_certs(tmp_path / "a", ["server"])["server"]
    other_ca, _ = create_ca(tmp_path / "b")
    assert not _handshake(server, other_ca, "127.0.0.1")


# ------------------------------------------------------------------------ CLI
def test_cli_init_issue_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "certs"
    assert certs_cli(["init", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert str(d / "ca.pem") in out and str(d / "ca.key") in out

    assert (
        certs_cli(["issue", "node1", "--dir", str(d), "--dns", "n1.lab", "--ip", "10.0.0.5", "--days", "30"])
        == 0
    )
    out = capsys.readouterr().out
    assert str(d / "node1.pem") in out and str(d / "node1.key") in out
    assert mode(d / "node1.key") == 0o600

    assert certs_cli(["show", str(d / "node1.pem")]) == 0
    out = capsys.readouterr().out
    assert "node1" in out and "n1.lab" in out and "10.0.0.5" in out and "macula-lab CA" in out

    assert certs_cli(["show", "--json", str(d / "node1.pem")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["subject"] == "node1" and "10.0.0.5" in info["ips"]


def test_cli_init_refuses_then_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs_cli(["init", "--dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert certs_cli(["init", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
    assert certs_cli(["init", "--dir", str(tmp_path), "--force"]) == 0


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs_cli(["issue", "node1", "--dir", str(tmp_path)]) == 2
    assert "certs init" in capsys.readouterr().err
    certs_cli(["init", "--dir", str(tmp_path)])
    assert certs_cli(["issue", "bad/name", "--dir", str(tmp_path)]) == 2
    assert certs_cli(["issue", "node1", "--dir", str(tmp_path), "--ip", "nope"]) == 2
    assert certs_cli(["show", str(tmp_path / "missing.pem")]) == 2
    assert capsys.readouterr().err.count("error: ") == 3
    assert certs_cli([]) == 2  # argparse usage error
    assert certs_cli(["bogus"]) == 2


def test_cli_default_dir_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MACULA_CERTS_DIR", str(tmp_path / "env"))
    assert certs_cli(["init"]) == 0
    assert (tmp_path / "env" / "ca.pem").exists()

    monkeypatch.delenv("MACULA_CERTS_DIR")
    monkeypatch.chdir(tmp_path)
    assert certs_cli(["init"]) == 0
    assert certs_cli(["issue", "node1"]) == 0
    assert (tmp_path / "certs" / "node1.pem").exists()
    capsys.readouterr()


# ------------------------------------------------------------------- identities
def test_a_certificate_binds_the_node_id_it_was_issued_for(ca_dir: Path) -> None:
    chosen = bytes(range(32))
    node = issue_node_cert(ca_dir, "node1", node_id=chosen)
    assert node.node_id == chosen and cert_node_id(load(node.cert)) == chosen
    assert issue_node_cert(ca_dir, "node2", node_id=chosen.hex()).node_id == chosen
    with pytest.raises(CertsError, match="node id"):
        issue_node_cert(ca_dir, "node3", node_id="zz")
    # the binding is invisible to host-name checks
    tls.verify_certificate(load(node.cert), chain=[], server_name="node1", cafile=str(node.ca))


def test_client_certificates_name_no_host_and_serve_no_one(ca_dir: Path) -> None:
    client = issue_client_cert(ca_dir, "lab")
    cert = load(client.cert)
    assert cert_node_id(cert) == client.node_id
    info = describe(client.cert)
    assert info["dns"] == [] and info["ips"] == []
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(tls.AlertBadCertificate):
        tls.verify_certificate(cert, chain=[], server_name="lab", cafile=str(client.ca))


def test_cli_issue_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "certs"
    assert certs_cli(["init", "--dir", str(d)]) == 0
    assert certs_cli(["issue-client", "lab", "--dir", str(d)]) == 0
    assert "client certificate" in capsys.readouterr().out
    assert cert_node_id(load(d / "lab.pem")) is not None
    assert describe(d / "lab.pem")["ips"] == []
