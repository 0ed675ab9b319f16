"""Multi-node test procedures: the testing guide's "What to verify" checklist as library code.

    from macula_lab.procedures import run_checklist, assert_passed, diagnose
    report = await run_checklist(lab, ttl=3.0)   # any lab: in the kernel or attached
    report                                       # a table; report.text() for logs
    assert_passed(report, lab)                   # ProcedureFailed if a check (or the lab) failed

Notebooks in ``notebooks/`` are thin drivers of these; ``macula-lab procedure
NAME -p key value`` runs one through papermill (see :mod:`.runner`).
"""

from __future__ import annotations

from .checklist import run_checklist
from .context import ChecklistConfig
from .report import Check, ProcedureFailed, Report, assert_passed, reports_in_notebook

__all__ = [
    "Check",
    "ChecklistConfig",
    "ProcedureFailed",
    "Report",
    "assert_passed",
    "reports_in_notebook",
    "run_checklist",
]
