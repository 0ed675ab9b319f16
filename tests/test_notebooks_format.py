"""Notebooks are committed stripped (reviewable in git) and follow the procedure conventions."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))
PROCEDURES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_there_are_procedures():
    assert [p.stem[:2] for p in PROCEDURES] == ["00", "01", "02", "03", "04", "05", "06", "08", "09"]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    if nb.nbformat_minor >= 5:  # cell ids are part of nbformat 4.5: one missing is a warning today
        # from the file itself: nbformat.read fills missing ids in (with that warning)
        ids = [cell.get("id") for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]]
        assert all(ids) and len(set(ids)) == len(ids), f"{path.name}: every cell needs a unique id"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: strip them"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
        assert not set(cell.metadata) - {"tags"}, f"{path.name} cell {i} has metadata {sorted(cell.metadata)}"
    assert set(nb.metadata) <= {"kernelspec", "language_info"}, sorted(nb.metadata)
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", PROCEDURES, ids=lambda p: p.name)
def test_procedure_conventions(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters' (papermill)"
    tree = ast.parse(params[0].source)
    assert all(isinstance(n, ast.Assign) for n in tree.body), "the parameters cell only assigns values"
    assert code[-1].source.strip() == "assert_passed(report, lab)", (
        "the last cell fails the run on a failed check"
    )
    assert any("report.record()" in c.source for c in code), "the report is recorded machine-readably"
    assert not any("time.sleep" in c.source or "asyncio.run(" in c.source for c in code)
