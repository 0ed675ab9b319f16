"""Prometheus metrics of a node, read from the node at scrape time.

A custom collector (rather than counters updated on the hot path) keeps the
request path free of metric bookkeeping: the transport's plain integer counters
are turned into Prometheus families only when ``/metrics`` is scraped.

Every family carries ``node`` and ``realm`` labels; per-service families add
``service`` and per-provider ones ``provider`` (the provider's node name when
this node has seen it, else the first 12 hex digits of its id).  What the
alerting and recording rules in ``deploy/monitoring/`` use:

==========================================  =====================================================
family                                      read from
==========================================  =====================================================
``macula_up``, ``macula_ready``             the node (``/ready`` says the same)
``macula_service_advertised{service}``      1 per service this node provides (its advertisements)
``macula_service_ttl_seconds{service}``     the advertisement's TTL
``macula_readvertise_lateness_seconds``     per service: how late the re-advertisement is *now*
                                            (overdue timer) or was at its last fire, whichever
                                            is larger; 0 when on time.  A dead timer grows it.
``macula_readvertise_total{service}``       re-advertisements done (timer fires)
``macula_service_publish_failures_total``   publications that reached no node, per service
``macula_service_replicas{service}``        nodes that stored the last publication
``macula_dht_providers{service}``           live provider entries this node stores as a replica
``macula_discovery_cache_hits_total``,      the discovery cache's counters (the hit ratio is a
``..._misses_total``                        recording rule)
``macula_dht_query_duration_seconds``       histogram of discovery lookups (cache misses)
``macula_rpc_rtt_seconds``                  histogram of successful provider calls
``macula_dht_lookups_total{kind}``          DHT lookups by kind (find_value = discovery, store,
                                            refresh, ...), ``..._not_found_total`` those that
                                            found nothing, ``..._unanswered_total`` the queried
                                            peers that did not answer
``macula_provider_*{provider}``             provider selection: selected, calls, failures,
                                            in-flight, latency EWMA
``macula_service_calls_ok_total``           successful service calls made from this node
``process_*``                               resident memory, CPU, open files (Linux)
==========================================  =====================================================

Histograms and the lookup counters are built from the bounded sample queues
the node keeps for the lab (``services.samples``, ``dht.lookups``): each scrape
adds the samples that arrived since the previous one.  When more arrived than a
queue holds (2,000 calls or 500 lookups between two scrapes), the oldest are
not counted and ``macula_metric_samples_dropped_total{series}`` says how many
scrapes lost some; the counters above (``..._calls_ok_total``, cache hits and
misses) are exact.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

#: upper bounds (seconds) of the latency histograms: 0.5 ms .. 10 s
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Tail:
    """The items appended to a bounded deque since the last read.

    The deque drops from the left when full, so the last item read is found
    again by identity (we hold a reference, so its id is never reused).  If it
    has fallen off, every item is new and some were missed (``lost`` counts it).
    """

    __slots__ = ("_last", "lost")

    def __init__(self) -> None:
        self._last: object = None
        self.lost = 0

    def new(self, queue: deque | None) -> list[Any]:
        if not queue:
            return []
        last, fresh = self._last, []
        for item in reversed(queue):
            if item is last:
                break
            fresh.append(item)
        else:
            if last is not None and queue.maxlen is not None and len(queue) >= queue.maxlen:
                self.lost += 1
        self._last = queue[-1]
        fresh.reverse()
        return fresh


class _Histogram:
    """Cumulative counts of observed values, exposed as a Prometheus histogram."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), running))
        return out


class NodeCollector:
    def __init__(self, node: Any):
        self.node = node
        self._tails = {name: _Tail() for name in ("dht_query", "rpc_rtt", "lookups")}
        self._hist = {"dht_query": _Histogram(), "rpc_rtt": _Histogram()}
        self._lookups: dict[str, list[int]] = {}  # kind -> [lookups, not found, unanswered queries]

    def collect(self) -> Iterator[Any]:
        node = self.node
        base = ["node", "realm"]
        values = [node.name, node.realm]
        stats = node.stats()
        t = stats["transport"]

        def family(kind, name: str, doc: str, extra: tuple[str, ...] = ()):
            return kind(name, doc, labels=[*base, *extra])

        def gauge(name: str, doc: str, value: float):
            g = family(GaugeMetricFamily, name, doc)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float):
            c = family(CounterMetricFamily, name, doc)
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
        watches = stats.get("watches", {})
        yield gauge("macula_watches", "watches of services running on this node", watches.get("watches", 0))
        yield gauge(
            "macula_watch_subscriptions", "watch subscriptions held as a replica", watches.get("watch_subscriptions", 0)
        )
        yield counter("macula_watch_pushes_sent", "watch events pushed to subscribers", watches.get("pushes_sent", 0))
        yield counter(
            "macula_watch_pushes_failed", "watch pushes that failed (the subscription ended)", watches.get("pushes_failed", 0)
        )
        yield counter(
            "macula_watch_missed_by_push",
            "changes a watch's reconciliation read found before any push delivered them",
            watches.get("missed_by_push", 0),
        )
        yield from self._services(family, values)
        yield from self._records(family, values)
        yield from self._cache(gauge, counter, stats.get("services", {}))
        yield from self._samples(family, values)
        yield from self._providers(family, values)

    # ----------------------------------------------------------- services
    def _services(self, family, values: list[str]) -> Iterator[Any]:
        services = getattr(self.node, "services", None)
        ads = dict(getattr(services, "ads", None) or {})
        now = _loop_time()
        advertised = family(
            GaugeMetricFamily,
            "macula_service_advertised",
            "1 for each service this node provides",
            ("service",),
        )
        ttl = family(
            GaugeMetricFamily, "macula_service_ttl_seconds", "TTL of the advertisement", ("service",)
        )
        late = family(
            GaugeMetricFamily,
            "macula_readvertise_lateness_seconds",
            "how late the re-advertisement is now (overdue timer) or was at its last fire, if later; 0 on time",
            ("service",),
        )
        fires = family(
            CounterMetricFamily, "macula_readvertise", "re-advertisements done (timer fires)", ("service",)
        )
        failures = family(
            CounterMetricFamily,
            "macula_service_publish_failures",
            "publications of the advertisement that reached no node",
            ("service",),
        )
        replicas = family(
            GaugeMetricFamily,
            "macula_service_replicas",
            "nodes that stored the last publication of the advertisement",
            ("service",),
        )
        for name, ad in sorted(ads.items()):
            labels = [*values, name]
            timer = ad.timer
            advertised.add_metric(labels, 1.0)
            ttl.add_metric(labels, float(ad.ttl))
            overdue = max(0.0, now - timer.next_fire) if now is not None else 0.0
            last = timer.lateness[-1] if timer.lateness else 0.0
            late.add_metric(labels, max(0.0, overdue, last))
            fires.add_metric(labels, float(timer.count))
            failures.add_metric(labels, float(ad.failures))
            replicas.add_metric(labels, float(ad.replicas))
        yield from (advertised, ttl, late, fires, failures, replicas)

    def _records(self, family, values: list[str]) -> Iterator[Any]:
        dht = getattr(self.node, "dht", None)
        now = _loop_time()
        per_service: dict[str, int] = {}
        if dht is not None and now is not None:
            for key, entry in dht.records.entries():
                if entry.live(now):
                    name = str(entry.metadata.get("service") or key.hex()[:12])
                    per_service[name] = per_service.get(name, 0) + 1
        g = family(
            GaugeMetricFamily,
            "macula_dht_providers",
            "live provider entries this node stores as a replica, per service",
            ("service",),
        )
        for name, n in sorted(per_service.items()):
            g.add_metric([*values, name], float(n))
        yield g

    @staticmethod
    def _cache(gauge, counter, services: dict[str, Any]) -> Iterator[Any]:
        yield counter(
            "macula_discovery_cache_hits", "discoveries answered by the cache", services.get("cache_hits", 0)
        )
        yield counter(
            "macula_discovery_cache_misses",
            "discoveries that needed a DHT lookup",
            services.get("cache_misses", 0),
        )
        yield counter(
            "macula_discovery_cache_evictions",
            "providers evicted from the cache after a failed call",
            services.get("cache_evictions", 0),
        )
        yield gauge(
            "macula_discovery_cache_services", "services in the cache", services.get("cache_services", 0)
        )

    # ------------------------------------------------------------ samples
    def _samples(self, family, values: list[str]) -> Iterator[Any]:
        node = self.node
        services = getattr(node, "services", None)
        samples = getattr(services, "samples", None) or {}
        for series in ("dht_query", "rpc_rtt"):
            for _, seconds in self._tails[series].new(samples.get(series)):
                self._hist[series].observe(seconds)
        dht = getattr(node, "dht", None)
        for record in self._tails["lookups"].new(getattr(dht, "lookups", None)):
            row = self._lookups.setdefault(record.kind, [0, 0, 0])
            row[0] += 1
            row[1] += 0 if record.found else 1
            row[2] += record.failures
        docs = {
            "dht_query": ("macula_dht_query_duration_seconds", "discovery lookups in the DHT (cache misses)"),
            "rpc_rtt": ("macula_rpc_rtt_seconds", "round trip of successful provider calls"),
        }
        for series, (name, doc) in docs.items():
            h = family(HistogramMetricFamily, name, doc)
            hist = self._hist[series]
            h.add_metric(values, hist.buckets(), hist.total)
            yield h
        lookups = family(CounterMetricFamily, "macula_dht_lookups", "DHT lookups, by kind", ("kind",))
        missing = family(
            CounterMetricFamily, "macula_dht_lookups_not_found", "DHT lookups that found nothing", ("kind",)
        )
        unanswered = family(
            CounterMetricFamily,
            "macula_dht_lookup_unanswered",
            "peers queried by DHT lookups that did not answer",
            ("kind",),
        )
        for kind, (n, not_found, failed) in sorted(self._lookups.items()):
            lookups.add_metric([*values, kind], n)
            missing.add_metric([*values, kind], not_found)
            unanswered.add_metric([*values, kind], failed)
        yield from (lookups, missing, unanswered)
        dropped = family(
            CounterMetricFamily,
            "macula_metric_samples_dropped",
            "scrapes that missed samples because the node's queue overflowed since the previous one",
            ("series",),
        )
        for series, tail in sorted(self._tails.items()):
            dropped.add_metric([*values, series], tail.lost)
        yield dropped
        yield _counter(
            family, "macula_service_calls_ok", "successful service calls", values, services, "ok_calls"
        )

    # ---------------------------------------------------------- providers
    def _providers(self, family, values: list[str]) -> Iterator[Any]:
        services = getattr(self.node, "services", None)
        stats = getattr(services, "stats", None)
        rows = stats.snapshot() if stats is not None else []
        names = self._names() if rows else {}
        specs = [
            (
                CounterMetricFamily,
                "macula_provider_selected",
                "times the strategy chose the provider",
                "selected",
            ),
            (CounterMetricFamily, "macula_provider_calls", "calls sent to the provider", "calls"),
            (
                CounterMetricFamily,
                "macula_provider_failures",
                "calls to the provider that failed",
                "failures",
            ),
            (
                GaugeMetricFamily,
                "macula_provider_in_flight",
                "calls to the provider now in flight",
                "in_flight",
            ),
            (
                GaugeMetricFamily,
                "macula_provider_latency_ewma_seconds",
                "smoothed latency of the provider's successful calls",
                "latency_ms",
            ),
        ]
        for kind, name, doc, field in specs:
            f = family(kind, name, doc, ("provider",))
            for row in rows:
                value = row.get(field)
                if value is None:
                    continue
                if field == "latency_ms":
                    value = value / 1000.0
                f.add_metric([*values, names.get(row["node_id"]) or row["node_id"][:12]], float(value))
            yield f

    def _names(self) -> dict[str, str]:
        """node id (hex) -> name, from the routing table, stored records and cached providers."""
        node = self.node
        names: dict[str, str] = {}
        dht = getattr(node, "dht", None)
        if dht is not None:
            for contact in dht.table.contacts() if hasattr(dht.table, "contacts") else ():
                if getattr(contact, "name", None):
                    names[contact.node_id.hex()] = contact.name
            for _, entry in dht.records.entries():
                if entry.metadata.get("node"):
                    names.setdefault(entry.node_id.hex(), str(entry.metadata["node"]))
        names[node.node_id.hex()] = node.name
        return names


def _counter(family, name: str, doc: str, values: list[str], obj: Any, attr: str):
    c = family(CounterMetricFamily, name, doc)
    c.add_metric(values, float(getattr(obj, attr, 0) or 0))
    return c


def _loop_time() -> float | None:
    """The running loop's clock (the node's timers use it); None outside a loop."""
    import asyncio

    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return None


def node_registry(node: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    # resident memory, CPU seconds, open files of the node's process (Linux /proc; none elsewhere)
    ProcessCollector(registry=registry)
    return registry


__all__ = ["LATENCY_BUCKETS", "NodeCollector", "node_registry"]
