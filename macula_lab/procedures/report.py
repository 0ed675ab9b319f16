"""Checks and the report that collects them: a table in the notebook, plain text in logs, JSON on disk.

Every box of the testing guide's "What to verify" list becomes one :class:`Check` (its
group and title are the testing guide's words), with whether it passed, the value that
was measured and the evidence behind the verdict.  A :class:`Report` holds the
checks of one procedure run, the lab's background errors and a metrics summary.

:meth:`Report.record` puts the report into the notebook as a display output of
MIME type ``application/json`` tagged ``{"macula_lab": "report"}`` in its
metadata (plain Jupyter display protocol, nothing papermill-specific), so the
executed ``.ipynb`` carries the result machine-readably;
:func:`reports_in_notebook` reads them back (the ``procedure`` runner does).
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import MaculaError
from .containers import describe

REPORT_TAG = "report"
#: the testing guide's groups, in its order
GROUPS = (
    "Service Advertisement",
    "Service Discovery",
    "RPC Execution",
    "Re-advertisement",
    "Cleanup",
)


@dataclass
class Check:
    """One checkbox: ``passed`` is None when the check could not run (counted as a failure)."""

    group: str
    title: str
    passed: bool | None
    measured: Any = None
    unit: str = ""
    evidence: str = ""

    @property
    def status(self) -> str:
        return "PASS" if self.passed else ("FAIL" if self.passed is False else "NOT RUN")

    def measured_text(self) -> str:
        value = self.measured
        if value is None:
            return ""
        if isinstance(value, float):
            value = f"{value:.3g}" if math.isfinite(value) else str(value)
        return f"{value} {self.unit}".strip()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["measured"] = _jsonable(self.measured)
        d["status"] = self.status
        return d


class ProcedureFailed(MaculaError, AssertionError):
    """A procedure run had failing checks or background errors (the notebook's last cell raises it)."""

    code = "procedure_failed"


@dataclass
class Report:
    """The result of one procedure run."""

    name: str
    checks: list[Check] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)  # the lab's background failures
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: what :func:`~.diagnose.diagnose` said when a check failed (``Diagnosis.to_dict()``)
    diagnosis: dict[str, Any] | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    #: what the nodes ran in, when known (``containers.containers_behind``: runtime, container names, image ids)
    deployment: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------- building
    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def extend(self, checks: list[Check]) -> None:
        self.checks.extend(checks)

    def merge(self, other: Report) -> Report:
        self.checks.extend(other.checks)
        self.errors.extend(e for e in other.errors if e not in self.errors)
        self.metrics.update(other.metrics)
        self.notes.extend(other.notes)
        self.diagnosis = self.diagnosis or other.diagnosis
        self.deployment = self.deployment or other.deployment
        self.parameters = {**other.parameters, **self.parameters}
        return self

    def finish(self, lab: Any = None) -> Report:
        """Stamp the end time and take the lab's background errors and metrics summary."""
        self.finished_at = time.time()
        if lab is not None:
            for err in list(getattr(lab, "errors", [])):
                if err not in self.errors:
                    self.errors.append(dict(err))
            try:
                self.metrics = {**_jsonable(lab.metrics_summary()), **self.metrics}
            except Exception as exc:  # a summary is a nicety; the checks are the result
                self.notes.append(f"metrics summary unavailable: {type(exc).__name__}: {exc}")
        return self

    # ----------------------------------------------------------- verdict
    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and not self.failed and not self.errors

    def ordered(self) -> list[Check]:
        rank = {g: i for i, g in enumerate(GROUPS)}
        return sorted(self.checks, key=lambda c: rank.get(c.group, len(GROUPS)))  # stable inside a group

    @property
    def duration(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started_at

    # ------------------------------------------------------------- views
    def summary_line(self) -> str:
        ok = len(self.checks) - len(self.failed)
        verdict = "PASSED" if self.passed else "FAILED"
        extra = f", {len(self.errors)} background error(s)" if self.errors else ""
        took = f" in {self.duration:.1f}s" if self.duration is not None else ""
        return f"{self.name}: {verdict}: {ok}/{len(self.checks)} checks passed{extra}{took}"

    def text(self) -> str:
        lines = [f"=== {self.summary_line()} ==="]
        if self.deployment:
            lines.append(f"ran against {describe(self.deployment)}")
        group = None
        for c in self.ordered():
            if c.group != group:
                group = c.group
                lines.append(f"{group}")
            measured = f" [{c.measured_text()}]" if c.measured_text() else ""
            lines.append(f"  [{'x' if c.passed else ' '}] {c.status:<7} {c.title}{measured}")
            if c.evidence and not c.passed:
                lines.append(f"            {c.evidence}")
        for err in self.errors:
            lines.append(f"  background error in {err.get('where')}: {err.get('error')}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.diagnosis:
            lines.append(f"  diagnosis: {self.diagnosis['verdict']}")
            for f in self.diagnosis["findings"]:
                if f["applies"]:
                    lines.append(f"    {f['case']}: {f['evidence']}\n      what to do: {f['fix']}")
        return "\n".join(lines)

    __str__ = text

    def __repr__(self) -> str:
        return f"<Report {self.summary_line()}>"

    def _repr_html_(self) -> str:
        colour = {"PASS": "#1a7f37", "FAIL": "#cf222e", "NOT RUN": "#9a6700"}
        rows, group = [], None
        for c in self.ordered():
            if c.group != group:
                group = c.group
                rows.append(f"<tr><th colspan='4' style='text-align:left'>{html.escape(group)}</th></tr>")
            rows.append(
                "<tr>"
                f"<td style='color:{colour[c.status]};font-weight:bold'>{c.status}</td>"
                f"<td style='text-align:left'>{html.escape(c.title)}</td>"
                f"<td>{html.escape(c.measured_text())}</td>"
                f"<td style='text-align:left'>{html.escape(c.evidence)}</td></tr>"
            )
        errors = "".join(
            f"<li>{html.escape(str(e.get('where')))}: {html.escape(str(e.get('error')))}</li>"
            for e in self.errors
        )
        errors = f"<p style='color:#cf222e'>Background errors:</p><ul>{errors}</ul>" if errors else ""
        if self.diagnosis:
            found = "".join(
                f"<li><b>{html.escape(f['case'])}</b>: {html.escape(f['evidence'])}<br>"
                f"<i>what to do:</i> {html.escape(f['fix'])}</li>"
                for f in self.diagnosis["findings"]
                if f["applies"]
            )
            errors += f"<p>Diagnosis: <b>{html.escape(self.diagnosis['verdict'])}</b></p><ul>{found}</ul>"
        verdict = colour["PASS" if self.passed else "FAIL"]
        where = f"<p>ran against {html.escape(describe(self.deployment))}</p>" if self.deployment else ""
        return (
            f"<div class='macula-report'><p style='color:{verdict};font-weight:bold'>"
            f"{html.escape(self.summary_line())}</p>{where}<table><thead><tr><th>status</th><th>check</th>"
            f"<th>measured</th><th>evidence</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"{errors}</div>"
        )

    # ------------------------------------------------------------ records
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "summary": self.summary_line(),
            "checks": [c.to_dict() for c in self.ordered()],
            "parameters": _jsonable(self.parameters),
            "errors": _jsonable(self.errors),
            "metrics": _jsonable(self.metrics),
            "notes": list(self.notes),
            "diagnosis": _jsonable(self.diagnosis),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "deployment": _jsonable(self.deployment),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        checks = [
            Check(
                c["group"],
                c["title"],
                c["passed"],
                c.get("measured"),
                c.get("unit", ""),
                c.get("evidence", ""),
            )
            for c in d.get("checks", [])
        ]
        return cls(
            d["name"],
            checks,
            d.get("parameters", {}),
            d.get("errors", []),
            d.get("metrics", {}),
            d.get("notes", []),
            d.get("diagnosis"),
            d.get("started_at", 0.0),
            d.get("finished_at"),
            d.get("deployment") or {},
        )

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    def record(self) -> None:
        """Display the report in the notebook: the table, and the JSON that the runner reads back."""
        from IPython.display import display

        display(
            {
                "application/json": self.to_dict(),
                "text/html": self._repr_html_(),
                "text/plain": self.text(),
            },
            raw=True,
            metadata={"application/json": {"macula_lab": REPORT_TAG}},
        )


def assert_passed(report: Report | list[Report], lab: Any = None) -> None:
    """Raise :class:`ProcedureFailed` if a check failed or the lab recorded background errors.

    The last cell of every procedure notebook calls this, so papermill fails the run.
    """
    reports = report if isinstance(report, list) else [report]
    problems: list[str] = []
    for r in reports:
        problems += [f"{r.name}: {c.group}: {c.title}: {c.status} ({c.evidence})" for c in r.failed]
        if not r.checks:
            problems.append(f"{r.name}: no check ran")
        problems += [f"{r.name}: background error in {e.get('where')}: {e.get('error')}" for e in r.errors]
    if lab is not None:
        seen = [e for r in reports for e in r.errors]
        problems += [
            f"lab: background error in {e['where']}: {e['error']}" for e in list(lab.errors) if e not in seen
        ]
    if problems:
        raise ProcedureFailed(f"{len(problems)} problem(s):\n" + "\n".join(problems))
    print("all checks passed: " + "; ".join(r.summary_line() for r in reports))


def reports_in_notebook(nb: Any) -> list[dict[str, Any]]:
    """The report dicts that :meth:`Report.record` left in an executed notebook (nbformat node or dict)."""
    out = []
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            meta = (output.get("metadata") or {}).get("application/json") or {}
            if meta.get("macula_lab") == REPORT_TAG and "application/json" in output.get("data", {}):
                data = output["data"]["application/json"]
                out.append(json.loads(data) if isinstance(data, str) else dict(data))
    return out


def _jsonable(value: Any) -> Any:
    """Plain JSON types (NaN/inf as None, tuples as lists, unknown objects as str)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return _jsonable(value.item())
    except ImportError:
        pass
    return str(value)
