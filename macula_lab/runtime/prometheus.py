"""Prometheus metrics of a node, read from the node at scrape time.

A custom collector (rather than counters updated on the hot path) keeps the
request path free of metric bookkeeping: the transport's plain integer counters
are turned into Prometheus families only when ``/metrics`` is scraped.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class NodeCollector:
    def __init__(self, node: Any):
        self.node = node

    def collect(self):
        node = self.node
        labels = ["node", "realm"]
        values = [node.name, node.realm]
        stats = node.stats()
        t = stats["transport"]

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("macula_up", "1 while the node is running", 1.0 if node.running else 0.0)
        yield gauge("macula_ready", "1 while the node is ready to serve", 1.0 if node.ready else 0.0)
        yield gauge("macula_uptime_seconds", "seconds since the node started", stats["uptime_s"])
        yield gauge("macula_tasks", "background tasks owned by the node", stats["tasks"])
        yield gauge(
            "macula_process_max_rss_bytes", "peak resident memory of the process", stats["max_rss_bytes"]
        )
        yield counter("macula_requests_sent", "requests sent to peers", t.get("requests_sent", 0))
        yield counter("macula_requests_served", "requests served for peers", t.get("requests_served", 0))
        yield counter("macula_bad_frames", "malformed frames received", t.get("bad_frames", 0))
        yield counter(
            "macula_refused_sessions", "sessions refused (realm mismatch)", t.get("refused_sessions", 0)
        )
        pool = t.get("pool", {})
        yield gauge("macula_pool_connections", "open outgoing connections", pool.get("open", 0))
        yield gauge(
            "macula_incoming_connections", "open incoming connections", t.get("incoming_connections", 0)
        )
        dht = stats.get("dht", {})
        yield gauge("macula_dht_contacts", "contacts in the routing table", dht.get("contacts", 0))
        yield gauge("macula_dht_keys", "DHT keys stored on this node", dht.get("keys", 0))
        yield counter("macula_dht_expired", "provider entries expired on this node", dht.get("expired", 0))


def node_registry(node: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry
