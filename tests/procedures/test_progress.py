"""Progress lines: which step, how many left."""

from __future__ import annotations

import io

from macula_lab.procedures.progress import Progress


def test_steps_and_notes():
    out = io.StringIO()
    p = Progress(3, title="run", stream=out)
    p.step("Service Advertisement")
    p.note("node-1 advertised")
    p.step("Service Discovery")
    p.step("Cleanup")
    p.finish()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[step 1/3] Service Advertisement (2 left")
    assert lines[1] == "    node-1 advertised"
    assert lines[3].startswith("[step 3/3] Cleanup (0 left")
    assert lines[-1].startswith("[done 3/3] run in")


def test_null_progress_prints_nothing(capsys):
    p = Progress.null()
    p.step("x")
    p.note("y")
    p.finish()
    assert capsys.readouterr().out == ""
