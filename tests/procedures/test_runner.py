"""``macula-lab procedure``: notebooks found by name, parameters parsed, reports read back, exit codes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import nbformat
import pytest

from macula_lab.cli import main
from macula_lab.deploy.procs import start_node_process
from macula_lab.procedures.runner import (
    NOTEBOOK_ENV,
    UnknownProcedure,
    available,
    find_notebook,
    parse_value,
    run_procedure,
)

PROCEDURES = [
    "00_quickstart",
    "01_local_multi_node",
    "02_containers",
    "03_k3s",
    "04_hosts",
    "05_selection_and_failover",
    "06_scale_study",
    "08_load",
    "09_tuning",
]


def test_every_procedure_is_found_by_number_and_name():
    assert [nb.stem for nb in available()] == PROCEDURES
    for stem in PROCEDURES:
        number, _, rest = stem.partition("_")
        assert find_notebook(number).stem == stem
        assert find_notebook(rest).stem == stem
        assert find_notebook(stem).stem == stem
    with pytest.raises(UnknownProcedure, match="available: 00_quickstart"):
        find_notebook("99")


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value('["a", "b"]') == ["a", "b"] and parse_value("node-3") == "node-3"
    assert parse_value("null") is None


def test_cli_list_and_unknown(capsys):
    assert main(["procedure", "--list"]) == 0
    listed = capsys.readouterr().out
    lines = listed.splitlines()
    for stem in PROCEDURES:
        [i] = [i for i, line in enumerate(lines) if line.startswith(stem + " ")]
        assert len(lines[i].split(None, 1)) == 2, f"{stem} has no description"
        needs_nodes = stem[:2] in ("02", "03", "04")
        assert lines[i + 1].strip().startswith("needs ") == needs_nodes, lines[i + 1]
    assert "seed" not in listed.lower() and "option" not in listed.lower()
    assert main(["procedure", "nope"]) == 2


def tiny(tmp_path, body: str):
    """A procedure notebook in a directory of its own: one parameter, one body cell."""
    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    )
    nb.cells = [
        nbformat.v4.new_code_cell("passed = True", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(body),
    ]
    path = tmp_path / "nbs" / "90_tiny.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    return path


BODY = """
from macula_lab.procedures import Check, Report, assert_passed
r = Report("tiny")
r.add(Check("Cleanup", "No orphaned processes or timers", passed, 0, "left over"))
r.finish()
r.record()
assert_passed(r)
"""


@pytest.mark.slow
def test_run_records_reports_and_exit_codes(tmp_path, monkeypatch, capsys):
    tiny(tmp_path, BODY)
    monkeypatch.setenv(NOTEBOOK_ENV, str(tmp_path / "nbs"))
    out = tmp_path / "out"
    assert main(["procedure", "90", "-o", str(out)]) == 0
    assert "tiny: PASSED: 1/1 checks passed" in capsys.readouterr().out
    saved = json.loads((out / "90_tiny.report.json").read_text())
    assert saved["passed"] and saved["reports"][0]["checks"][0]["status"] == "PASS"
    assert (out / "90_tiny.html").read_text().count("No orphaned processes") >= 1

    run = run_procedure("90_tiny", {"passed": False}, output_dir=out, html=False)
    assert run.exit_code == 1 and "ProcedureFailed" in run.error
    assert run.reports[0]["passed"] is False  # the report was recorded before the last cell failed
    executed = nbformat.read(run.executed, as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)


@pytest.mark.slow
def test_no_report_is_a_failure(tmp_path, monkeypatch):
    tiny(tmp_path, "x = 1")
    monkeypatch.setenv(NOTEBOOK_ENV, str(tmp_path / "nbs"))
    run = run_procedure("90", output_dir=tmp_path / "out", html=False)
    assert run.error is None and run.reports == [] and run.exit_code == 1
    assert "no report was recorded" in run.summary()


def _procedure_cli(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "macula_lab", "procedure", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r, time.monotonic() - t0


# a retry loop would wait out attach_timeout: failing well before it shows there was none
ATTACH_TIMEOUT = 90


@pytest.mark.slow
def test_missing_ca_file_fails_at_once(tmp_path):
    r, wall = _procedure_cli(
        "02_containers", "-p", "ca", "/nonexistent/ca.pem", "-p", "attach_timeout", str(ATTACH_TIMEOUT),
        "-o", str(tmp_path), "--no-html",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ca: no such file /nonexistent/ca.pem" in r.stdout
    # progress while the kernel starts, then cell by cell
    assert "--- starting the python3 kernel" in r.stdout and "--- cell 1/" in r.stdout, r.stdout
    assert "waiting for the nodes" not in r.stdout and wall < ATTACH_TIMEOUT / 2, (wall, r.stdout)


@pytest.mark.slow
async def test_wrong_realm_fails_at_once_naming_both_realms(certs, tmp_path):
    d = certs["node-6"].ca.parent
    node = await start_node_process(
        "node-6",
        ["--listen", "quic://127.0.0.1:0", "--realm", "com.test.lab", "--certs-dir", str(d), "--health-listen", "127.0.0.1:0"],
    )
    try:
        c = certs["client"]
        r, wall = await asyncio.to_thread(
            _procedure_cli,
            "04_hosts", "-p", "endpoints", json.dumps([node.endpoint]), "-p", "realm", "com.test.beam",
            "-p", "ca", str(c.ca), "-p", "cert", str(c.cert), "-p", "key", str(c.key),
            "-p", "attach_timeout", str(ATTACH_TIMEOUT), "-o", str(tmp_path), "--no-html",
        )
    finally:
        await node.stop()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "'com.test.lab'" in r.stdout and "'com.test.beam'" in r.stdout, r.stdout
    assert "waiting for the nodes" not in r.stdout and wall < ATTACH_TIMEOUT / 2, (wall, r.stdout)


@pytest.mark.slow
def test_html_report_header_and_no_input(tmp_path, monkeypatch):
    tiny(tmp_path, BODY)
    monkeypatch.setenv(NOTEBOOK_ENV, str(tmp_path / "nbs"))
    run = run_procedure("90", {"passed": False}, output_dir=tmp_path / "out")
    page = run.html.read_text()
    assert "<title>90_tiny: FAILED</title>" in page and "macula-report-header" in page
    assert "parameter passed" in page and "tiny: FAILED: 0/1 checks passed" in page
    assert "hl-ipython3" not in page  # no code cells by default (the traceback still quotes the line)
    saved = json.loads(run.report_json.read_text())
    assert saved["parameters"] == {"passed": False} and saved["version"] and saved["date"]
    assert (tmp_path / "out" / "plotly.min.js").is_file()
    shown = run_procedure("90", output_dir=tmp_path / "with-input", with_input=True)
    assert "hl-ipython3" in shown.html.read_text()


def test_procedure_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["procedure", "-h"])
    shown = capsys.readouterr().out
    assert "macula-lab procedure NAME -p key value" in shown and "``" not in shown
