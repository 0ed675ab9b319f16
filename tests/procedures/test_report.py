"""Checks and reports: verdict, text, HTML, JSON round trip, notebook records, the final assertion."""

from __future__ import annotations

import json

import nbformat
import pytest

from macula_lab.procedures import Check, ProcedureFailed, Report, assert_passed, reports_in_notebook
from macula_lab.procedures.report import REPORT_TAG


def make(passed: bool = True) -> Report:
    r = Report("demo", parameters={"ttl": 3.0})
    r.add(Check("Cleanup", "Unadvertise removes from DHT", True, 3, "record(s) removed", "gone"))
    r.add(
        Check(
            "Service Advertisement", "Service published to DHT successfully", passed, 3, "replica(s)", "why"
        )
    )
    return r.finish()


def test_verdict_and_order():
    ok, bad = make(), make(False)
    assert ok.passed and not ok.failed
    assert not bad.passed and [c.title for c in bad.failed] == ["Service published to DHT successfully"]
    # the testing guide's group order, whatever the order the checks were added in
    assert [c.group for c in ok.ordered()] == ["Service Advertisement", "Cleanup"]
    assert not Report("empty").passed  # no check ran: not a pass


def test_not_run_counts_as_failure():
    r = Report("x")
    r.add(Check("RPC Execution", "Call reaches provider", None, evidence="step raised"))
    assert not r.passed and r.checks[0].status == "NOT RUN"


def test_text_and_html():
    bad = make(False)
    text = bad.text()
    assert "FAILED: 1/2 checks passed" in text and "[ ] FAIL" in text and "why" in text
    html = bad._repr_html_()
    assert "<table>" in html and "FAIL" in html and "Service published" in html


def test_background_errors_fail_the_report():
    r = make()
    r.errors.append({"at": 0.0, "where": "sampling node-1", "error": "Unauthorized: no"})
    assert not r.passed
    assert "background error" in r.text()


def test_json_round_trip():
    r = make(False)
    r.measured_nan = Check("x", "y", True, float("nan"))
    r.add(r.measured_nan)
    d = json.loads(r.to_json())  # NaN becomes null: strict JSON
    assert d["passed"] is False and d["checks"][0]["status"] in ("PASS", "FAIL")
    back = Report.from_dict(d)
    assert [c.title for c in back.checks] == [c.title for c in r.ordered()]
    assert back.passed == r.passed


def test_assert_passed():
    assert_passed(make())
    with pytest.raises(ProcedureFailed, match="Service published"):
        assert_passed(make(False))

    class FakeLab:
        errors = [{"at": 0.0, "where": "view update", "error": "KeyError: x"}]

    with pytest.raises(ProcedureFailed, match="view update"):
        assert_passed(make(), FakeLab())
    with pytest.raises(AssertionError):  # ProcedureFailed is an AssertionError too
        assert_passed(Report("nothing"))


def test_reports_in_notebook():
    r = make()
    output = nbformat.v4.new_output(
        "display_data",
        data={"application/json": r.to_dict(), "text/plain": r.text()},
        metadata={"application/json": {"macula_lab": REPORT_TAG}},
    )
    other = nbformat.v4.new_output("display_data", data={"application/json": {"a": 1}})
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[other, output])])
    found = reports_in_notebook(nb)
    assert len(found) == 1 and found[0]["name"] == "demo" and found[0]["passed"]
