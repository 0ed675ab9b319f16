"""The testing guide's "Performance Metrics to Collect", from the lab's metrics table, as numbers and plots.

============================  ==================================================
guide metric                  source (``lab.metrics()`` rows)
============================  ==================================================
DHT Query Latency             ``dht_query_ms`` samples (one per lookup)
Cache Hit Ratio               ``cache_hits`` / (``cache_hits`` + ``cache_misses``)
Re-advertisement Reliability  ``readvertise_lateness_ms`` samples (actual - planned)
Multi-provider Selection      ``selected`` counters, by provider
Network Latency               ``rpc_rtt_ms`` samples (one per successful call)
Memory Usage                  ``process_rss_bytes``, ``stored_records``, ``tasks``
============================  ==================================================

:func:`guide_metrics` gives them as a JSON-able dict (recorded in the report),
:func:`plot_metrics` as one plotly figure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..lab.lab import Lab

SEED_METRICS = {
    "dht_query_latency_ms": "dht_query_ms",
    "network_latency_ms": "rpc_rtt_ms",
    "readvertise_lateness_ms": "readvertise_lateness_ms",
}


def guide_metrics(lab: Lab) -> dict[str, Any]:
    """The testing guide's metrics over the whole run (latest gauges summed over nodes; samples as quantiles)."""
    summary = lab.metrics_summary()
    out: dict[str, Any] = {name: summary.get(metric, {"count": 0}) for name, metric in SEED_METRICS.items()}
    out["cache_hit_ratio"] = summary.get("cache_hit_ratio", {}).get("last")
    out["cache_hits"] = summary.get("cache_hits", {}).get("last", 0)
    out["cache_misses"] = summary.get("cache_misses", {}).get("last", 0)
    out["provider_selection"] = {
        k[len("selected[") : -1]: v["last"] for k, v in summary.items() if k.startswith("selected[")
    }
    out["memory"] = {
        "process_rss_bytes": summary.get("process_rss_bytes", {}).get("last"),
        "stored_records": summary.get("stored_records", {}).get("last"),
        "tasks": summary.get("tasks", {}).get("last"),
    }
    return out


def configure_plotly(renderer: str = "plotly_mimetype+notebook") -> None:
    """Figures as plotly JSON (live in JupyterLab) plus self-contained HTML (static reports, nbconvert)."""
    import plotly.io as pio

    pio.renderers.default = renderer


def plot_metrics(lab: Lab, title: str = "Performance metrics"):
    """Six panels: DHT query latency, RPC round trip, re-advertisement lateness, cache hit ratio,
    provider selection, memory.  Needs plotly and pandas (the ``notebook`` extra)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    table = lab.metrics()
    names = sorted(set(table["node"])) if len(table) else []
    fig = make_subplots(
        rows=2,
        cols=3,
        subplot_titles=(
            "DHT query latency (ms)",
            "Network latency: RPC round trip (ms)",
            "Re-advertisement lateness (ms)",
            "Cache hit ratio",
            "Multi-provider selection (calls)",
            "Memory: process RSS (MiB)",
        ),
    )
    panels = [
        ("dht_query_ms", 1, 1, "markers"),
        ("rpc_rtt_ms", 1, 2, "markers"),
        ("readvertise_lateness_ms", 1, 3, "markers+lines"),
        ("cache_hit_ratio", 2, 1, "lines"),
    ]
    in_legend: set[str] = set()  # one legend entry per node, whichever panel shows it first
    for metric, row, col, mode in panels:
        for node in names:
            part = table[(table["metric"] == metric) & (table["node"] == node)]
            if len(part):
                first = node not in in_legend
                in_legend.add(node)
                fig.add_trace(
                    go.Scatter(
                        x=part["time"],
                        y=part["value"],
                        mode=mode,
                        name=node,
                        legendgroup=node,
                        showlegend=first,
                        marker={"color": colour_for(node, names), "size": 5},
                    ),
                    row=row,
                    col=col,
                )
    selected = table[table["metric"] == "selected"]
    if len(selected):
        last = selected.sort_values("time").groupby(["node", "label"], as_index=False).last()
        for node in sorted(set(last["node"])):
            part = last[last["node"] == node]
            fig.add_trace(
                go.Bar(
                    x=part["label"],
                    y=part["value"],
                    name=f"from {node}",
                    legendgroup=node,
                    showlegend=False,
                    marker={"color": colour_for(node, names)},
                ),
                row=2,
                col=2,
            )
    rss = table[table["metric"] == "process_rss_bytes"]
    # nodes in this process share its memory: one line, not the same one per node
    shared = getattr(lab, "mode", "") == "local"
    for node in names[:1] if shared else names:
        part = rss[rss["node"] == node]
        if len(part):
            fig.add_trace(
                go.Scatter(
                    x=part["time"],
                    y=part["value"] / 2**20,
                    mode="lines",
                    name="the lab's process (all its nodes)" if shared else node,
                    legendgroup="process" if shared else node,
                    showlegend=shared,
                    line={"color": "#555" if shared else colour_for(node, names)},
                ),
                row=2,
                col=3,
            )
    for row, col in ((1, 1), (1, 2), (1, 3), (2, 1), (2, 3)):  # times of day, to the ms when zoomed in
        fig.update_xaxes(type="date", tickformatstops=TIME_TICKS, row=row, col=col)
    fig.update_layout(title=title, height=620, margin={"t": 80, "l": 40, "r": 20, "b": 40}, barmode="group")
    return fig


#: d3 time formats by zoom (plotly's default shows "03:07:59.05" next to full dates)
TIME_TICKS = [
    {"dtickrange": [None, 1000], "value": "%H:%M:%S.%L"},
    {"dtickrange": [1000, None], "value": "%H:%M:%S"},
]
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def colour_for(name: str, names: list[str]) -> str:
    """One colour per node name, stable within a figure."""
    return PALETTE[names.index(name) % len(PALETTE)] if name in names else "#999"
