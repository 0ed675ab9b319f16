"""Metrics dashboard: live plotly charts of the testing guide's metrics, one colour per node.

Six panels of one ``FigureWidget`` (plotly >= 6 renders it through anywidget):
DHT query latency, RPC round trip, re-advertisement lateness (one point per
sample, ms), discovery cache hit ratio (per node), provider selection counts
(bars: provider on x, stacked by the node that chose it) and sizes (the
``size`` dropdown: routing table, stored records, pending calls, tasks, process
memory).  Data come from ``lab.recorder`` (what :meth:`Lab.metrics` tabulates),
restricted to the last ``window`` seconds; every trace carries its metric name
in ``meta``.
"""

from __future__ import annotations

import html
import time
from collections import defaultdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

import ipywidgets as w
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._base import LabView, colour, figure_widget, keep_figure_state

if TYPE_CHECKING:
    from ..lab.lab import Lab

#: (metric, row, col, title) of the time-series panels
SERIES_PANELS = (
    ("dht_query_ms", 1, 1, "DHT query latency (ms)"),
    ("rpc_rtt_ms", 1, 2, "RPC round trip (ms)"),
    ("readvertise_lateness_ms", 2, 1, "re-advertisement lateness (ms)"),
    ("cache_hit_ratio", 2, 2, "discovery cache hit ratio"),
)
SELECTION_PANEL = (3, 1, "provider selections (by calling node)")
SIZE_PANEL = (3, 2, "sizes")
SIZES = {
    "routing_table_size": ("routing table (contacts)", 1.0),
    "stored_records": ("stored provider records", 1.0),
    "pending_calls": ("pending calls", 1.0),
    "tasks": ("node tasks", 1.0),
    "process_rss_bytes": ("process memory (MB)", 1e-6),
}
#: d3 time formats by zoom: seconds, or milliseconds under a one-second tick spacing
TIME_TICKS = [
    {"dtickrange": [None, 1000], "value": "%H:%M:%S.%L"},
    {"dtickrange": [1000, None], "value": "%H:%M:%S"},
]
_SAMPLES = {"dht_query_ms", "rpc_rtt_ms", "readvertise_lateness_ms"}


class MetricsDashboard(LabView):
    """Live charts of ``lab.recorder``; ``figure`` is the plotly FigureWidget."""

    css_class = "macula-metrics"

    def __init__(self, lab: Lab, *, window: float = 300.0, min_interval: float = 0.5, height: int = 720):
        super().__init__(lab)
        self.window = window
        self.min_interval = min_interval
        self._last_draw = 0.0
        titles = [""] * 6
        for _m, row, col, title in SERIES_PANELS:
            titles[(row - 1) * 2 + col - 1] = title
        titles[4], titles[5] = SELECTION_PANEL[2], SIZE_PANEL[2]
        self.figure = make_subplots(
            rows=3,
            cols=2,
            subplot_titles=titles,
            vertical_spacing=0.13,
            horizontal_spacing=0.08,
        )
        self.figure.update_layout(
            height=height,
            margin={"l": 40, "r": 10, "t": 40, "b": 30},
            barmode="stack",
            legend={"orientation": "h", "y": -0.06},
            uirevision="macula",  # keep zoom across updates
        )
        # date axes from the start: before its first point an axis is linear, and a time
        # format on it is a bad number format to plotly (a warning on every redraw)
        self.figure.update_xaxes(type="date", tickformatstops=TIME_TICKS, nticks=6)
        self.figure.update_xaxes(type="category", tickformatstops=None, nticks=None, row=3, col=1)  # providers
        self.figure.update_yaxes(range=[0, 1.05], row=2, col=2)
        self.size = w.Dropdown(options=[(v[0], k) for k, v in SIZES.items()], value="routing_table_size",
                               description="size")  # fmt: skip
        self.size.observe(lambda _c: self.refresh(), "value")
        self.summary = w.HTML()
        self.summary.add_class("macula-metrics-summary")
        self._traces: dict[tuple[str, str], int] = {}  # (metric or panel, node) -> index in figure.data
        self.refresh()
        # a widget made from a figure holding its traces and data: traces added or restyled
        # before the browser drew the widget once left it blank or out of step
        self.figure = figure_widget(self.figure)
        self.children = [self.size, self.figure, self.summary, self.status]

    def _on_sample(self, lab: Lab) -> None:
        now = time.monotonic()
        if not self._closed and now - self._last_draw >= self.min_interval:
            self.refresh()

    # ------------------------------------------------------------ data
    def collect(self) -> dict[str, Any]:
        """The data drawn: ``series[(metric, node)] = (times, values)``, ``selected[(node, provider)] = n``.

        Reads the recorder's rows newest first and stops a minute before the
        window (rows come in sampling order; a late batch of samples can be a
        little older than its neighbours), so a long-running lab costs a window,
        not its whole history.
        """
        cutoff = time.time() - self.window
        series: dict[tuple[str, str], tuple[list, list]] = defaultdict(lambda: ([], []))
        selected: dict[tuple[str, str], float] = {}
        wanted = {m for m, *_ in SERIES_PANELS} | {self.size.value, "cache_hits", "cache_misses"}
        rows = self.lab.recorder.rows
        try:
            newest_first = list(_until_older(reversed(rows), cutoff - 60.0))
        except RuntimeError:  # appended to by another thread (a lab on a background loop)
            newest_first = list(_until_older(reversed(list(rows)), cutoff - 60.0))
        for r in reversed(newest_first):
            if r["time"] < cutoff:
                continue
            metric = r["metric"]
            if metric == "selected":
                selected[(r["node"], r["label"])] = r["value"]
            elif metric in wanted:
                xs, ys = series[(metric, r["node"])]
                xs.append(r["time"])
                ys.append(r["value"])
        for xs, ys in series.values():  # samples arrive per node in batches: keep the x axis ordered
            if any(a > b for a, b in zip(xs, xs[1:], strict=False)):
                pairs = sorted(zip(xs, ys, strict=True))
                xs[:], ys[:] = [p[0] for p in pairs], [p[1] for p in pairs]
        return {"series": dict(series), "selected": selected}

    # ------------------------------------------------------------ drawing
    def _trace(self, key: str, node: str, row: int, col: int, kind: str, nodes: list[str]) -> Any:
        idx = self._traces.get((key, node))
        if idx is None:
            first = not any(n == node for (_k, n) in self._traces)
            style = {"name": node, "legendgroup": node, "showlegend": first, "meta": key}
            c = colour(node, nodes)
            if kind == "bar":
                self.figure.add_bar(x=[], y=[], marker_color=c, **style, row=row, col=col)
            else:
                mode = "markers" if key in _SAMPLES else "lines"
                self.figure.add_scatter(
                    x=[], y=[], mode=mode, marker={"color": c, "size": 5}, line={"color": c}, **style,
                    row=row, col=col,
                )  # fmt: skip
            idx = self._traces[(key, node)] = len(self.figure.data) - 1
        return self.figure.data[idx]

    def refresh(self) -> None:
        if self._closed:
            return
        self._last_draw = time.monotonic()
        data = self.collect()
        nodes = self.lab.names
        size_metric = self.size.value
        label, scale = SIZES[size_metric]
        updates: list[tuple[Any, dict[str, Any]]] = []
        for metric, row, col, _title in SERIES_PANELS:
            for node in nodes:
                xs, ys = data["series"].get((metric, node), ([], []))
                if xs or (metric, node) in self._traces:
                    trace = self._trace(metric, node, row, col, "scatter", nodes)
                    updates.append((trace, {"x": _times(xs), "y": ys}))
        row, col, _ = SIZE_PANEL
        for node in nodes:
            xs, ys = data["series"].get((size_metric, node), ([], []))
            if xs or ("size", node) in self._traces:
                trace = self._trace("size", node, row, col, "scatter", nodes)
                updates.append((trace, {"x": _times(xs), "y": [v * scale for v in ys], "meta": size_metric}))
        by_caller: dict[str, dict[str, float]] = defaultdict(dict)
        for (caller, provider), n in data["selected"].items():
            by_caller[caller][provider] = n
        row, col, _ = SELECTION_PANEL
        for caller in nodes:
            chosen = by_caller.get(caller, {})
            if chosen or ("selected", caller) in self._traces:
                trace = self._trace("selected", caller, row, col, "bar", nodes)
                providers = sorted(chosen)
                updates.append((trace, {"x": providers, "y": [chosen[p] for p in providers]}))
        with self.figure.batch_update():
            for trace, values in updates:
                trace.update(values)
            self.figure.layout.annotations[5].text = f"sizes: {label}"
        if isinstance(self.figure, go.FigureWidget):
            keep_figure_state(self.figure)
        self._summarize(data)

    def _summarize(self, data: dict[str, Any]) -> None:
        """One line of numbers over the window: sample counts and quantiles, overall cache hit ratio."""
        parts = []
        for metric, name in (("dht_query_ms", "DHT queries"), ("rpc_rtt_ms", "RPCs"),
                             ("readvertise_lateness_ms", "re-advertisements")):  # fmt: skip
            values = sorted(v for (m, _n), (_xs, ys) in data["series"].items() if m == metric for v in ys)
            if values:
                p50, p95 = (values[min(len(values) - 1, round(q * (len(values) - 1)))] for q in (0.5, 0.95))
                parts.append(f"{name}: {len(values)} (p50 {p50:.2f} ms, p95 {p95:.2f} ms)")
        last = {key: ys[-1] for key, (_xs, ys) in data["series"].items() if ys}
        hits = sum(v for (m, _n), v in last.items() if m == "cache_hits")
        misses = sum(v for (m, _n), v in last.items() if m == "cache_misses")
        if hits + misses:
            parts.append(f"cache hit ratio {hits / (hits + misses):.2f}")
        window = f"last {self.window / 60:g} min" if self.window >= 60 else f"last {self.window:g} s"
        self.summary.value = (
            f"{window}: " + html.escape(" · ".join(parts)) if parts else "<i>no samples yet</i>"
        )


def _until_older(rows, limit: float):
    for r in rows:
        if r["time"] < limit:
            return
        yield r


def _times(xs: list[float]) -> list[datetime]:
    return [datetime.fromtimestamp(x) for x in xs]
