"""Smoke test of bench/hostile.py: one short round of every attack at once, tiny flood sizes.

It checks the instrument, not the node: the harness runs end to end (mesh,
legitimate caller, flooder, report, JSON) and exits 0 whatever the verdicts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench" / "hostile.py"
SIZES = {"halfopen": 20, "idle": 10, "store": 200, "badframe": 100, "partial": 2}


def test_hostile_bench_runs_every_attack_and_reports(tmp_path):
    out = tmp_path / "hostile.json"
    cmd = [
        sys.executable,
        str(BENCH),
        "--only",
        "all",
        "--duration",
        "1",
        "--rate",
        "20",
        "--settle",
        "0",
        "--halfopen",
        str(SIZES["halfopen"]),
        "--idle",
        str(SIZES["idle"]),
        "--stores",
        str(SIZES["store"]),
        "--store-service",
        "20",
        "--store-identities",
        "2",
        "--bad-frames",
        str(SIZES["badframe"]),
        "--partial-mib",
        str(SIZES["partial"]),
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| quiet (all)" in proc.stdout and "all: flood p50 / quiet p50" in proc.stdout

    doc = json.loads(out.read_text())
    (rnd,) = doc["rounds"]
    assert rnd["attack"] == "all" and rnd["error"] is None
    quiet, flood = rnd["quiet"], rnd["flood"]
    assert quiet["load"]["calls"] == flood["load"]["calls"] == 20
    assert quiet["rss_before"] > 0 and flood["rss_peak"] >= flood["rss_before"]
    # the flooder ran every attack and said what it sent
    report = rnd["flooder"]
    assert set(report) == set(SIZES)
    assert report["halfopen"]["planned"] == SIZES["halfopen"] and report["halfopen"]["sent"] > 0
    assert report["idle"]["planned"] == SIZES["idle"]
    assert report["store"]["planned"] == SIZES["store"] and report["store"]["sent"] > 0
    assert report["badframe"]["planned"] == SIZES["badframe"] and report["badframe"]["sent"] > 0
    assert report["partial"]["planned_streams"] == SIZES["partial"]
    assert {v["label"].split(":")[0] for v in doc["verdicts"]} == {"all"}
