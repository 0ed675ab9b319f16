"""``macula-lab procedure``: notebooks found by name, parameters parsed, reports read back, exit codes."""

from __future__ import annotations

import json

import nbformat
import pytest

from macula_lab.cli import main
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
    assert "01_local_multi_node" in capsys.readouterr().out
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
