"""Smoke tests of the benchmarks: each one runs end to end on a tiny workload.

They check the instruments, not the figures: a benchmark whose nodes cannot
connect (as happened when certificates started binding node ids) must fail
here, not print a table of zeros.  Speed is judged by running the benchmarks
themselves (bench/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_bench(name: str, tmp_path: Path, *args: str, timeout: float = 240) -> dict:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(BENCH / f"{name}.py"), *args, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_dht_bench_builds_a_mesh_that_answers(tmp_path):
    doc = run_bench(
        "dht",
        tmp_path,
        *("--sizes", "25", "--keys", "4", "--lookups", "20", "--churn-lookups", "10"),
        *("--rounds", "1", "--settle", "0", "--systems", "macula,kademlia"),
    )
    by_system = {s["system"]: s for s in doc["summary"]}
    assert set(by_system) == {"macula", "kademlia"}
    for s in by_system.values():
        assert not s["crashed"] and s["errors"] == 0
        assert s["figures"]["store_success"] == 1.0 and s["figures"]["lookup_success"] == 1.0
    labels = {c["label"] for c in doc["checks"]}
    assert "macula store p50 / kademlia, N=25" in labels and "macula mesh build time / kademlia, N=25" in labels


def test_transport_bench_measures_every_system(tmp_path):
    doc = run_bench("transport", tmp_path, "--quick", "-n", "200", "--warmup", "50")
    for name, result in doc["results"].items():
        assert result["error"] is None, name
        assert result["throughput_rps"] > 0, name


def test_services_bench_measures_both_paths(tmp_path):
    doc = run_bench("services", tmp_path, "--quick", "-n", "200", "--warmup", "50")
    for name, result in doc["results"].items():
        assert result["error"] is None, name
    assert {o["verdict"] for o in doc["overheads"]} <= {"PASS", "MISS", "info"}


def test_lab_start_bench_starts_both_transports(tmp_path):
    doc = run_bench("lab_start", tmp_path, "--runs", "1", "--lookups", "20", "--cases", "quic:5,memory:20")
    assert set(doc["results"]) == {"quic:5", "memory:20"}
    for case, runs in doc["results"].items():
        (run,) = runs
        assert run["found"] == run["lookups"] == 20, case
        assert run["bootstrap_timeouts"] == 0, case
        assert run["start_s"] > 0 and run["first_advertise_ms"] > 0, case


def test_procedure_bench_times_the_main_job(tmp_path):
    doc = run_bench("procedure", tmp_path, "--runs", "1", "--transport", "memory", timeout=300)
    assert doc["failures"] == [] and len(doc["walls_s"]) == 1
    assert doc["walls_s"][0] > 0 and doc["verdict"] in ("PASS", "MISS")


def test_watch_bench_measures_both_transports(tmp_path):
    doc = run_bench("watch", tmp_path, "--nodes", "6", "--watchers", "2", "--changes", "4")
    assert [r["transport"] for r in doc["results"]] == ["quic", "memory"]
    for r in doc["results"]:
        assert "error" not in r, r
        assert r["samples"] == 8 and r["missed"] == r["duplicates"] == 0, r
        assert 0 < r["p50"] <= r["p99"], r
