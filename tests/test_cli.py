"""The `macula-lab` command: node processes, env configuration, ping, certs, demo."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from macula_lab.deploy.procs import NodeProcessError, start_node_process
from macula_lab.runtime.node import Node
from macula_lab.transport.quic import TlsConfig

from .conftest import client_args

REALM = "com.test.cli"


def _cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "macula_lab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _node_args(certs_dir) -> list[str]:
    return [
        "--listen",
        "quic://127.0.0.1:0",
        "--realm",
        REALM,
        "--certs-dir",
        str(certs_dir),
        "--health-listen",
        "127.0.0.1:0",
    ]


async def test_two_node_processes_talk_and_stop_gracefully(certs):
    d = certs["node-1"].ca.parent
    p1 = await start_node_process("node-1", _node_args(d))
    p2 = await start_node_process("node-2", [*_node_args(d), "--bootstrap", p1.endpoint])
    client = Node(name="client", realm=REALM, listen=None, tls=TlsConfig.from_node_cert(certs["client"]))
    try:
        await client.start()
        # a third process (this one) calls into both node processes
        for p in (p1, p2):
            info = await client.call_procedure(p.endpoint, "macula.info")
            assert info["name"] == p.name and info["realm"] == REALM
            assert await client.call_procedure(p.endpoint, "macula.echo", {"x": [1, 2]}) == {"x": [1, 2]}
        assert p2.contacts == 1 and any(" joined: " in line for line in p2.lines), p2.log_text()
        health = json.loads(await asyncio.to_thread(_get, f"http://127.0.0.1:{p1.health_port}/health"))
        assert health["ready"] is True and health["name"] == "node-1"
        metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{p1.health_port}/metrics")
        assert 'macula_requests_served_total{node="node-1"' in metrics
    finally:
        await client.stop()
        codes = [await p.stop() for p in (p1, p2)]
    assert codes == [0, 0]
    assert any("shutting down" in line for line in p1.lines)
    assert any("stopped" in line for line in p1.lines)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


async def test_node_takes_its_configuration_from_the_environment(certs):
    d = certs["node-3"].ca.parent
    env = {
        "MACULA_REALM": "com.test.env",
        "MACULA_LISTEN": "quic://127.0.0.1:0",
        "MACULA_CERTS_DIR": str(d),
        "MACULA_HEALTH_LISTEN": "off",
        "MACULA_LOG_LEVEL": "DEBUG",
    }
    p = await start_node_process("node-3", [], env=env)
    client = Node(name="client", realm="com.test.env", listen=None, tls=TlsConfig.from_node_cert(certs["client"]))
    try:
        await client.start()
        info = await client.call_procedure(p.endpoint, "macula.info")
        assert info["realm"] == "com.test.env"
        assert p.health_port is None
    finally:
        await client.stop()
        assert await p.stop() == 0


def test_bad_configuration_is_a_clear_error():
    r = _cli("node", "--name", "n", "--realm", "bad..realm", "--insecure")
    assert r.returncode == 2
    assert "MACULA_REALM" in r.stderr and "--realm" in r.stderr


async def test_node_without_certificate_exits_with_reason():
    with pytest.raises(NodeProcessError, match="certificate"):
        await start_node_process(
            "nocert", ["--listen", "quic://127.0.0.1:0", "--health-listen", "off"], timeout=20
        )


async def test_ping_command(certs):
    d = certs["node-4"].ca.parent
    p = await start_node_process("node-4", _node_args(d))
    try:
        r = await asyncio.to_thread(
            _cli, "ping", p.endpoint, "--realm", REALM, *_client_flags(certs), "--count", "2"
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("PONG from node-4") == 2
        r = await asyncio.to_thread(
            _cli, "ping", p.endpoint, "--realm", "com.other", *_client_flags(certs)
        )
        assert r.returncode == 1 and "RealmMismatch" in r.stderr
        r = await asyncio.to_thread(_cli, "ping", p.endpoint, "--realm", REALM)
        assert r.returncode == 2 and "--ca" in r.stderr
    finally:
        await p.stop()


def test_certs_subcommand(tmp_path):
    r = _cli("certs", "init", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    r = _cli("certs", "issue", "node-9", "--dir", str(tmp_path), "--ip", "10.1.2.3", "--dns", "node-9.lab")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "node-9.pem").exists() and (tmp_path / "node-9.key").exists()


def _demo_certs(stdout: str) -> Path:
    [line] = [ln for ln in stdout.splitlines() if ln.startswith("lab CA, node and client certificates in ")]
    return Path(line.rsplit(" in ", 1)[1])


def test_demo_runs_end_to_end():
    r = _cli("demo", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and "checks passed" in r.stdout
    assert "(3 nodes," in r.stdout and not _demo_certs(r.stdout).parent.exists()  # work directory removed


def test_demo_nodes_and_keep():
    r = _cli("demo", "--nodes", "4", "--keep", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    work = _demo_certs(r.stdout).parent
    try:
        assert "(4 nodes," in r.stdout and "node-4 exited with 0" in r.stdout
        assert f"work directory kept: {work}" in r.stdout
        assert (work / "certs" / "ca.pem").exists() and (work / "certs" / "node-4.pem").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def test_node_serves_builtin_handlers_from_the_environment(certs):
    import macula_lab

    d = certs["node-5"].ca.parent
    env = {"MACULA_SERVE": "math.add=calculator,who.am.i=whoami", "MACULA_SERVICE_TTL": "30"}
    p = await start_node_process("node-5", _node_args(d), env=env)
    try:
        assert any("services=math.add,who.am.i" in line for line in p.lines), p.log_text()
        client = await macula_lab.connect(p.endpoint, realm=REALM, **client_args(certs))
        try:
            assert await client.call("math.add", {"operation": "add", "a": 10, "b": 5}) == {
                "result": 15,
                "node": "node-5",
            }
            assert await client.call("who.am.i") == {"node": "node-5"}
            [provider] = await client.discover("math.add")
            assert 25 < provider.ttl <= 30 and provider.metadata["node"] == "node-5"  # remaining TTL
        finally:
            await client.close()
    finally:
        assert await p.stop() == 0


def test_unknown_serve_kind_stops_the_node_at_startup():
    r = _cli("node", "--name", "n", "--insecure", "--serve", "math.add=abacus", env={"MACULA_SERVE": ""})
    assert r.returncode == 2
    assert "unknown handler kind 'abacus'" in r.stderr and "MACULA_SERVE" in r.stderr


def _client_flags(certs) -> list[str]:
    c = certs["client"]
    return ["--ca", str(c.ca), "--cert", str(c.cert), "--key", str(c.key)]


# ----------------------------------------------- insecure mode, certificates from the environment
async def test_insecure_node_warns_and_only_an_insecure_ping_goes_without_a_certificate(certs):
    d = certs["node-6"].ca.parent
    insecure = await start_node_process("node-6", [*_node_args(d), "--insecure"])
    secure = await start_node_process("node-7", _node_args(d))
    try:
        warning = "CERTIFICATE VERIFICATION IS OFF for node node-6"
        assert any(warning in line for line in insecure.lines), insecure.log_text()
        assert not any("VERIFICATION IS OFF" in line for line in secure.lines)
        r = await asyncio.to_thread(_cli, "ping", insecure.endpoint, "--realm", REALM, "--insecure", "--count", "1")
        assert r.returncode == 0 and "PONG from node-6" in r.stdout, r.stderr
        assert "CERTIFICATE VERIFICATION IS OFF for node macula-ping" in r.stderr  # the ping warns too
        # a node that verifies refuses the same ping: it presents no certificate of the lab CA
        r = await asyncio.to_thread(_cli, "ping", secure.endpoint, "--realm", REALM, "--insecure", "--count", "1")
        assert r.returncode == 1 and "Unauthenticated" in r.stderr and "PONG" not in r.stdout
    finally:
        codes = [await p.stop() for p in (insecure, secure)]
    assert codes == [0, 0]


async def test_ping_takes_the_ca_and_its_certificate_from_the_environment(certs, foreign_certs):
    d = certs["node-8"].ca.parent
    p = await start_node_process("node-8", _node_args(d))
    c = certs["client"]
    env = {"MACULA_CA": str(c.ca), "MACULA_CERT": str(c.cert), "MACULA_KEY": str(c.key)}
    try:
        r = await asyncio.to_thread(_cli, "ping", p.endpoint, "--realm", REALM, "--count", "1", env=env)
        assert r.returncode == 0 and "PONG from node-8" in r.stdout, r.stderr
        # MACULA_CA is what verifies the node: another lab's CA does not
        other = {**env, "MACULA_CA": str(foreign_certs["client"].ca)}
        r = await asyncio.to_thread(_cli, "ping", p.endpoint, "--realm", REALM, "--count", "1", env=other)
        assert r.returncode == 1 and "PONG" not in r.stdout and "error:" in r.stderr
    finally:
        assert await p.stop() == 0


# ----------------------------------------------------------------- procedure NAME -p KEY VALUE
def test_procedure_command_parameters_and_a_failing_verdict(tmp_path):
    out = tmp_path / "runs"
    r = _cli(
        *("procedure", "01", "-p", "transport", "memory", "-p", "ttl", "1.0", "-p", "readvertise_cycles", "1"),
        *("-p", "no_readvertise", "node-3", "--no-html", "--timeout", "120", "-o", str(out)),
        timeout=300,
    )
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "01_local_multi_node: FAILED" in r.stdout and "ProcedureFailed" in r.stdout
    saved = json.loads((out / "01_local_multi_node.report.json").read_text())
    [report] = saved["reports"]
    assert saved["passed"] is False and report["passed"] is False
    # -p values reached the notebook, parsed as JSON where they parse
    params = report["parameters"]
    assert params["ttl"] == 1.0 and params["readvertise_cycles"] == 1  # an int: compared as one
    assert params["faults"] == {"node-3": "no_readvertise"}
    failed = {c["title"] for c in report["checks"] if c["status"] == "FAIL"}
    assert "Timer fires at correct interval" in failed
    assert (out / "01_local_multi_node.ipynb").exists() and not (out / "01_local_multi_node.html").exists()


def test_procedure_command_passes_and_writes_the_html_report(tmp_path):
    out = tmp_path / "runs"
    r = _cli("procedure", "local_multi_node", "-p", "transport", "memory", "-o", str(out), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "01_local_multi_node: PASSED" in r.stdout
    assert "PASSED" in (out / "01_local_multi_node.html").read_text()


def test_procedure_command_timeout_stops_a_hung_cell(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    )
    nb.cells = [
        nbformat.v4.new_code_cell("pause = 600", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import time\ntime.sleep(pause)"),
    ]
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "91_hang.ipynb")
    # without --timeout this run would sleep 600 s and hit the subprocess timeout below
    r = _cli(
        *("procedure", "91", "--timeout", "3", "--no-html", "-o", str(tmp_path / "out")),
        env={"MACULA_LAB_NOTEBOOKS": str(tmp_path / "nbs")},
        timeout=240,
    )
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "91_hang: the notebook failed" in r.stdout and "3 seconds" in r.stdout


def test_every_option_has_help():
    """`-h` explains every option of ping and demo (it listed --count, --timeout and --nodes bare)."""
    import argparse

    from macula_lab.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("ping", "demo"):
        for action in subparsers.choices[name]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
