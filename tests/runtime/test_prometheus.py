"""The node's Prometheus collector: families the alerting rules need, read from the node at scrape time."""

from __future__ import annotations

import asyncio
from collections import deque

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from macula_lab.runtime.prometheus import _Histogram, _Tail, node_registry


def scrape(registry) -> dict[str, list]:
    """family name -> samples, parsed back from the text exposition."""
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples, name: str, **labels) -> float:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def test_tail_reads_each_item_once_and_counts_overflows():
    q: deque = deque(maxlen=3)
    tail = _Tail()
    assert tail.new(q) == []
    a, b = ("a",), ("b",)
    q.extend([a, b])
    assert tail.new(q) == [a, b]
    assert tail.new(q) == []
    c = ("c",)
    q.append(c)
    assert tail.new(q) == [c] and tail.lost == 0
    more = [(i,) for i in range(5)]  # more than the queue holds: the oldest were never seen
    q.extend(more)
    assert tail.new(q) == more[-3:] and tail.lost == 1
    same = ("x",)  # equal but distinct tuples are distinct samples
    q.extend([same, ("x",)])
    assert len(tail.new(q)) == 2


def test_histogram_buckets_are_cumulative():
    h = _Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0, float("nan")):
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.count == 4 and abs(h.total - 3.65) < 1e-9


async def test_families_for_services_lookups_calls_and_a_dead_timer(nodes):
    a = await nodes("node-1")
    b = await nodes("node-2", bootstrap=[a.endpoint])
    await a.advertise("math.add", lambda args: args, ttl=1.0)
    for _ in range(5):
        await b.call("math.add", 1)
    provider, caller = node_registry(a), node_registry(b)
    p = scrape(provider)
    base = {"node": "node-1", "realm": "com.test.lab", "service": "math.add"}
    assert value(p["macula_service_advertised"], "macula_service_advertised", **base) == 1
    assert value(p["macula_service_ttl_seconds"], "macula_service_ttl_seconds", **base) == 1.0
    assert value(p["macula_service_replicas"], "macula_service_replicas", **base) == 2
    assert value(p["macula_dht_providers"], "macula_dht_providers", service="math.add") == 1
    c = scrape(caller)
    assert value(c["macula_rpc_rtt_seconds"], "macula_rpc_rtt_seconds_count") == 5
    assert value(c["macula_rpc_rtt_seconds"], "macula_rpc_rtt_seconds_bucket", le="+Inf") == 5
    assert value(c["macula_dht_query_duration_seconds"], "macula_dht_query_duration_seconds_count") == 1
    assert value(c["macula_discovery_cache_hits"], "macula_discovery_cache_hits_total") == 4
    assert value(c["macula_discovery_cache_misses"], "macula_discovery_cache_misses_total") == 1
    assert value(c["macula_service_calls_ok"], "macula_service_calls_ok_total") == 5
    assert value(c["macula_dht_lookups"], "macula_dht_lookups_total", kind="find_value") >= 1
    assert value(c["macula_provider_selected"], "macula_provider_selected_total", provider="node-1") == 5
    assert "process_resident_memory_bytes" in c
    await b.call("math.add", 1)
    c = scrape(caller)  # a second scrape adds only the new samples
    assert value(c["macula_rpc_rtt_seconds"], "macula_rpc_rtt_seconds_count") == 6
    # re-advertisement lateness: on time, then growing once the timer is dead
    assert value(p["macula_readvertise_lateness_seconds"], "macula_readvertise_lateness_seconds") < 0.2
    assert a.services.stop_readvertising("math.add")
    await asyncio.sleep(1.2)  # due at 0.8 s
    p = scrape(provider)
    late = value(p["macula_readvertise_lateness_seconds"], "macula_readvertise_lateness_seconds", **base)
    assert late > 0.1 * 1.0  # what MaculaReadvertiseLate compares with the TTL
    await a.unadvertise("math.add")
    assert scrape(provider)["macula_service_advertised"] == []  # its series go away (stale in Prometheus)
