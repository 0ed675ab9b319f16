"""Time series of the testing guide's "Performance Metrics to Collect", as one tidy table.

The lab samples every node's inspection snapshot (``metrics`` and ``providers``
sections) on a timer and appends rows ``(time, node, metric, value, label)``:

==========================  =====================================================
metric                      what it is
==========================  =====================================================
``dht_query_ms``            one discovery lookup in the DHT (a sample per query)
``rpc_rtt_ms``              one successful provider call, round trip (per call)
``readvertise_lateness_ms`` actual minus scheduled fire time of a re-advertisement
``cache_hit_ratio``         discovery cache hits / lookups (gauge)
``cache_hits``/``_misses``  discovery cache counters (gauge)
``selected``                calls this node sent to provider ``label`` (counter)
``routing_table_size``      contacts in the routing table (gauge)
``stored_records``          provider records stored by this node (gauge)
``pending_calls``           calls in flight from this node (gauge)
``tasks``                   asyncio tasks the node owns (gauge)
``process_rss_bytes``       resident memory of the node's process (gauge)
==========================  =====================================================

Samples are taken on the node (its clock) and fetched incrementally (``since``),
so a slow poll loses nothing that the node still holds.  ``time`` is wall-clock
seconds.  :meth:`MetricsRecorder.table` returns a pandas DataFrame when pandas is
installed (the ``notebook`` extra), else a list of dicts.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

SAMPLE_SERIES = {
    "dht_query": "dht_query_ms",
    "rpc_rtt": "rpc_rtt_ms",
    "readvertise_lateness": "readvertise_lateness_ms",
}
GAUGES = (
    "cache_hit_ratio",
    "cache_hits",
    "cache_misses",
    "routing_table_size",
    "stored_records",
    "pending_calls",
    "tasks",
    "process_rss_bytes",
)
COLUMNS = ("time", "node", "metric", "value", "label")


class MetricsRecorder:
    def __init__(self, max_rows: int = 200_000):
        self.rows: deque[dict[str, Any]] = deque(maxlen=max_rows)
        self.since: dict[str, float] = {}  # node -> newest sample time already recorded

    def ingest(self, node: str, snap: dict[str, Any]) -> int:
        """Append the rows of one inspection snapshot; returns how many."""
        t = float(snap.get("time", 0.0))
        before = len(self.rows)
        metrics = snap.get("metrics") or {}
        newest = self.since.get(node, 0.0)
        for series, metric in SAMPLE_SERIES.items():
            for at, seconds in metrics.get("samples", {}).get(series, []):
                if at > self.since.get(node, 0.0):
                    self._add(at, node, metric, seconds * 1000.0)
                    newest = max(newest, at)
        self.since[node] = newest
        gauges = metrics.get("gauges", {})
        for metric in GAUGES:
            if metric in gauges:
                self._add(t, node, metric, gauges[metric])
        for row in snap.get("providers") or []:
            self._add(t, node, "selected", row["selected"], row["provider"])
        return len(self.rows) - before

    def _add(self, t: float, node: str, metric: str, value: Any, label: str = "") -> None:
        self.rows.append({"time": t, "node": node, "metric": metric, "value": float(value), "label": label})

    def records(self, metric: str | None = None, node: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.rows
            if (metric is None or r["metric"] == metric) and (node is None or r["node"] == node)
        ]

    def table(self, metric: str | None = None, node: str | None = None) -> Any:
        rows = self.records(metric, node)
        try:
            import pandas as pd
        except ImportError:
            return rows
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        frame["time"] = pd.to_datetime(frame["time"], unit="s")
        return frame

    def summary(self) -> dict[str, dict[str, float]]:
        """Per metric over all nodes: count/p50/p95/max/mean (samples), or the last values summed (gauges)."""
        out: dict[str, dict[str, float]] = {}
        for metric in SAMPLE_SERIES.values():
            values = sorted(r["value"] for r in self.rows if r["metric"] == metric)
            if values:
                out[metric] = {
                    "count": len(values),
                    "p50": _quantile(values, 0.5),
                    "p95": _quantile(values, 0.95),
                    "max": values[-1],
                    "mean": statistics.fmean(values),
                }
        latest: dict[tuple[str, str, str], float] = {}
        for r in self.rows:
            if r["metric"] not in SAMPLE_SERIES.values():
                latest[(r["metric"], r["node"], r["label"])] = r["value"]
        for (metric, _node, label), value in latest.items():
            key = f"selected[{label}]" if metric == "selected" else metric
            if metric == "cache_hit_ratio":
                continue
            slot = out.setdefault(key, {"last": 0.0})
            # nodes in one process share it: memory is the largest, not the sum
            slot["last"] = max(slot["last"], value) if metric == "process_rss_bytes" else slot["last"] + value
        hits, misses = (
            out.get("cache_hits", {}).get("last", 0.0),
            out.get("cache_misses", {}).get("last", 0.0),
        )
        if hits + misses:
            out["cache_hit_ratio"] = {"last": hits / (hits + misses)}
        return out

    def clear(self) -> None:
        self.rows.clear()


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]
