"""Peer certificate checks, once per process: successes remembered, failures never."""

from __future__ import annotations

import pytest
from aioquic import tls

from macula_lab.transport import verify
from macula_lab.transport.certs import issue_node_cert, lab_certs, load_cert


@pytest.fixture
def ca(tmp_path):
    certs = lab_certs(tmp_path, ["n1"], ips=["10.0.0.1"])
    verify.forget()
    yield verify.TrustedCA(certs["n1"].ca.read_bytes()), certs
    verify.forget()


def test_a_good_certificate_is_checked_once(ca, monkeypatch):
    trusted, certs = ca
    cert = load_cert(certs["n1"].cert)
    calls = []
    real = verify.verify_certificate
    monkeypatch.setattr(verify, "verify_certificate", lambda **kw: calls.append(kw) or real(**kw))
    for _ in range(5):
        verify.verify_peer(cert, [], ca=trusted, server_name="10.0.0.1")
    assert len(calls) == 1
    verify.verify_peer(cert, [], ca=trusted)  # another name (here: none) is another check
    assert len(calls) == 2


def test_failures_are_never_remembered(ca, tmp_path, monkeypatch):
    trusted, certs = ca
    cert = load_cert(certs["n1"].cert)
    for _ in range(3):
        with pytest.raises(tls.AlertBadCertificate):
            verify.verify_peer(cert, [], ca=trusted, server_name="10.9.9.9")  # a name it does not hold
    other = lab_certs(tmp_path / "other", ["n1"])["n1"]
    with pytest.raises(tls.AlertBadCertificate):
        verify.verify_peer(load_cert(other.cert), [], ca=trusted)  # another CA
    assert len(verify._verified) == 0


def test_a_remembered_certificate_that_expired_is_checked_again(ca, monkeypatch):
    trusted, certs = ca
    cert = load_cert(certs["n1"].cert)
    verify.verify_peer(cert, [], ca=trusted)
    [key] = verify._verified
    verify._verified[key] = cert.not_valid_before_utc  # as if its validity ended already
    calls = []
    monkeypatch.setattr(verify, "verify_certificate", lambda **kw: calls.append(kw))
    verify.verify_peer(cert, [], ca=trusted)
    assert len(calls) == 1  # not answered from memory


def test_the_cache_is_bounded(ca, tmp_path, monkeypatch):
    trusted, certs = ca
    monkeypatch.setattr(verify, "MAX_ENTRIES", 3)
    for i in range(6):
        node = issue_node_cert(certs["n1"].ca.parent, f"m{i}")
        verify.verify_peer(load_cert(node.cert), [], ca=trusted)
    assert len(verify._verified) == 3
