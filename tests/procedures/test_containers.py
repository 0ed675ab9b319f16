"""containers_behind: which containers serve a procedure's endpoints, and how a report shows it.

Against recorded ``inspect`` output of both engines here; against real podman
containers in tests/deploy/test_containers.py.
"""

from __future__ import annotations

import pytest

from macula_lab.procedures import containers
from macula_lab.procedures.containers import containers_behind, describe
from macula_lab.procedures.report import Check, Report


def podman_container(n: int) -> dict:
    """The parts of ``podman inspect`` output that matter (podman 4.3)."""
    return {
        "Id": f"{n}" * 64,
        "Name": f"macula_node{n}",
        "Image": "4f445e8bce0fb5e155788d8c2a8982956baff5901b5e108d0cda42c2755b062f",
        "ImageName": "localhost/macula-lab:latest",
        "Config": {"Hostname": f"node-{n}", "Labels": {"com.docker.compose.service": f"node-{n}"}},
        "NetworkSettings": {
            "Ports": {"9443/udp": [{"HostIp": "", "HostPort": str(9442 + n)}], "8080/tcp": None},
            "Networks": {"macula-lab_macula": {"IPAddress": f"172.20.0.1{n}", "Aliases": [f"node-{n}"]}},
        },
    }


def docker_container(n: int) -> dict:
    return {
        "Id": f"{n}" * 64,
        "Name": f"/macula_node{n}",
        "Image": "sha256:" + "ab" * 32,
        "Config": {"Hostname": f"node-{n}", "Image": "macula-lab:latest", "Labels": {}},
        "NetworkSettings": {
            "Ports": {"9443/udp": [{"HostIp": "0.0.0.0", "HostPort": str(9442 + n)}]},
            "Networks": {"macula-lab_macula": {"IPAddress": f"172.20.0.1{n}", "Aliases": None}},
        },
    }


@pytest.fixture
def engine(monkeypatch):
    """``engine({"podman": [...], "docker": [...]})``: what each CLI's ``ps``+``inspect`` would return."""

    def set_(found: dict[str, list[dict]]) -> None:
        monkeypatch.setattr(containers, "_inspect_all", lambda cli: found.get(cli, []))

    return set_


def test_endpoints_are_matched_by_address_name_and_published_port(engine):
    engine({"podman": [podman_container(n) for n in (1, 2, 3)]})
    found = containers_behind(["quic://172.20.0.11:9443", "quic://node-2:9443", "quic://localhost:9445"])
    assert found["runtime"] == "podman"
    assert [(c["endpoint"], c["name"]) for c in found["containers"]] == [
        ("quic://172.20.0.11:9443", "macula_node1"),
        ("quic://node-2:9443", "macula_node2"),
        ("quic://localhost:9445", "macula_node3"),
    ]
    assert found["containers"][0]["image"] == "localhost/macula-lab:latest"
    assert found["containers"][0]["image_id"].startswith("4f445e8bce0f")
    assert describe(found) == (
        "podman containers macula_node1, macula_node2, macula_node3 (image localhost/macula-lab:latest 4f445e8bce0f)"
    )


def test_docker_inspect_output_works_too(engine):
    engine({"docker": [docker_container(1)]})
    [row] = containers_behind(["quic://172.20.0.11:9443", "quic://10.0.0.5:9443"])["containers"]
    assert row == {
        "endpoint": "quic://172.20.0.11:9443",
        "name": "macula_node1",
        "id": "111111111111",
        "image": "macula-lab:latest",
        "image_id": "ab" * 32,
    }


def test_nothing_is_claimed_without_a_matching_container(engine):
    engine({})
    assert containers_behind(["quic://172.20.0.11:9443"]) == {}
    engine({"podman": [podman_container(1)]})
    assert containers_behind(["quic://127.0.0.1:9999", "quic://beam00.lab:9443"]) == {}
    assert describe({}) == ""


def test_no_cli_means_no_containers(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert containers_behind(["quic://172.20.0.11:9443"]) == {}


def test_a_report_records_and_shows_its_deployment():
    deployment = {"runtime": "podman", "containers": [dict(zip(("endpoint", "name", "id", "image", "image_id"),
        ("quic://172.20.0.11:9443", "macula_node1", "1" * 12, "localhost/macula-lab:latest", "f" * 64), strict=True))]}  # fmt: skip
    report = Report("02_containers", [Check("Cleanup", "x", True)], deployment=deployment)
    assert "ran against podman containers macula_node1 (image localhost/macula-lab:latest ffffffffffff)" in (
        report.text()
    )
    assert "ran against podman containers macula_node1" in report._repr_html_()
    again = Report.from_dict(report.to_dict())
    assert again.deployment == deployment and again.text() == report.text()
    assert Report("other").merge(report).deployment == deployment
    assert "ran against" not in Report("bare", [Check("Cleanup", "x", True)]).text()
