"""The metrics recorder: tidy rows from inspection snapshots, incremental and de-duplicated."""

from __future__ import annotations

import pytest

from macula_lab.lab.metrics import MetricsRecorder


def _snap(t, samples=None, gauges=None, providers=()):
    return {
        "time": t,
        "metrics": {"samples": samples or {}, "gauges": gauges or {}},
        "providers": list(providers),
    }


def test_ingest_is_incremental_and_skips_samples_seen():
    rec = MetricsRecorder()
    rec.ingest("n1", _snap(10.0, {"dht_query": [[1.0, 0.002], [2.0, 0.004]]}))
    # an overlapping poll returns the old samples again: they are not counted twice
    rec.ingest("n1", _snap(11.0, {"dht_query": [[2.0, 0.004], [3.0, 0.006]]}))
    values = [r["value"] for r in rec.records("dht_query_ms")]
    assert values == pytest.approx([2.0, 4.0, 6.0]) and rec.since["n1"] == 3.0
    assert rec.summary()["dht_query_ms"]["p50"] == pytest.approx(4.0)


def test_gauges_and_selection_counts():
    rec = MetricsRecorder()
    gauges = {"cache_hits": 3, "cache_misses": 1, "process_rss_bytes": 100, "routing_table_size": 2}
    rec.ingest("n1", _snap(1.0, gauges=gauges, providers=[{"provider": "n2", "selected": 4}]))
    rec.ingest("n2", _snap(1.0, gauges={**gauges, "process_rss_bytes": 150}))
    s = rec.summary()
    assert s["cache_hit_ratio"]["last"] == pytest.approx(0.75)
    assert s["routing_table_size"]["last"] == 4 and s["process_rss_bytes"]["last"] == 150
    assert s["selected[n2]"]["last"] == 4
    frame = rec.table("selected")
    assert list(frame.columns) == ["time", "node", "metric", "value", "label"] and frame.label[0] == "n2"
