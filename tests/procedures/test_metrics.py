"""The testing guide's metrics from the lab's table, and their plot."""

from __future__ import annotations

from macula_lab.lab import Lab
from macula_lab.procedures.metrics import guide_metrics, plot_metrics


async def test_guide_metrics_and_plot():
    lab = await Lab.start(n=3, realm="com.test.metrics", sample_interval=None)
    try:
        await lab.node("node-1").advertise("m.s", "whoami", ttl=30)
        for _ in range(5):
            await lab.node("node-2").call("m.s", {})
        await lab.sample()
        m = guide_metrics(lab)
        fig = plot_metrics(lab)
    finally:
        await lab.stop()
    assert m["network_latency_ms"]["count"] >= 5 and m["dht_query_latency_ms"]["count"] >= 1
    assert m["provider_selection"] == {"node-1": 5.0}
    assert 0 < m["cache_hit_ratio"] <= 1 and m["memory"]["process_rss_bytes"] > 0
    names = {t.name for t in fig.data}
    assert {"node-2"} <= names and len(fig.layout.annotations) == 6  # six titled panels
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert len(legend) == len(set(legend)), legend  # each node once in the legend
    [memory] = [t for t in fig.data if t.xaxis == "x6"]  # one process: one memory line, not one per node
    assert memory.name == "the lab's process (all its nodes)"
    assert fig.layout.xaxis.type == "date" and fig.layout.xaxis.tickformatstops[0].value == "%H:%M:%S.%L"
