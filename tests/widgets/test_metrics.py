"""Metrics dashboard: the FigureWidget's traces follow the lab's sampled metrics."""

from __future__ import annotations

import time

from macula_lab.widgets import MetricsDashboard

from .test_base import lab_fixture, until  # noqa: F401  (the lab fixture)


def traces(dash: MetricsDashboard) -> dict[tuple[str, str], object]:
    return {(t.meta, t.name): t for t in dash.figure.data}


async def test_charts_follow_calls_and_selections(lab):
    dash = MetricsDashboard(lab, min_interval=0.0)
    try:
        await lab.node("node-1").advertise("svc.m", "echo", ttl=30)
        for _ in range(5):
            await lab.node("node-3").call("svc.m", {"x": 1})
        await until(lambda: ("rpc_rtt_ms", "node-3") in traces(dash), what="an RPC trace")
        await until(lambda: len(traces(dash)[("rpc_rtt_ms", "node-3")].y) == 5, what="five RPC points")
        t = traces(dash)
        rtt = t[("rpc_rtt_ms", "node-3")]
        assert all(0 < v < 1000 for v in rtt.y) and rtt.mode == "markers"
        assert len(t[("dht_query_ms", "node-3")].y) == 1  # one lookup, then the cache
        bars = t[("selected", "node-3")]
        assert bars.type == "bar" and list(bars.x) == ["node-1"] and list(bars.y) == [5]
        assert {n for (m, n) in t if m == "cache_hit_ratio"} == {"node-1", "node-2", "node-3"}
        assert t[("cache_hit_ratio", "node-3")].y[-1] == 0.8
        # one legend entry per node, one colour per node across panels
        assert sum(1 for tr in dash.figure.data if tr.showlegend) == 3
        assert rtt.marker.color == bars.marker.color == t[("cache_hit_ratio", "node-3")].line.color
        assert "RPCs: 5" in dash.summary.value and "cache hit ratio" in dash.summary.value
    finally:
        dash.close()


async def test_size_panel_switches_metric(lab):
    dash = MetricsDashboard(lab, min_interval=0.0)
    try:
        await until(lambda: ("routing_table_size", "node-1") in traces(dash), what="size traces")
        assert traces(dash)[("routing_table_size", "node-1")].y[-1] == 2  # routing table: the two others
        assert dash.figure.layout.annotations[5].text == "sizes: routing table (contacts)"
        dash.size.value = "process_rss_bytes"
        size = traces(dash)[("process_rss_bytes", "node-1")]
        assert 1 < size.y[-1] < 10_000  # MB
        assert ("routing_table_size", "node-1") not in traces(dash)
        assert dash.figure.layout.annotations[5].text == "sizes: process memory (MB)"
    finally:
        dash.close()
    assert dash.closed and dash.figure.comm is None


async def test_only_the_window_is_drawn(lab):
    dash = MetricsDashboard(lab, window=60.0, min_interval=0.0)
    try:
        now = time.time()
        lab.recorder._add(now - 100, "node-1", "rpc_rtt_ms", 1.0)  # before the window
        lab.recorder._add(now, "node-1", "rpc_rtt_ms", 2.0)
        dash.refresh()
        assert list(traces(dash)[("rpc_rtt_ms", "node-1")].y) == [2.0]
        assert dash.summary.value.startswith("last 1 min: RPCs: 1 (p50 2.00 ms")
    finally:
        dash.close()
