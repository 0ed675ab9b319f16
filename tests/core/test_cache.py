import pytest

from macula_lab.core.cache import DEFAULT_CACHE_TTL, DiscoveryCache
from macula_lab.core.ids import random_id
from macula_lab.core.records import ProviderEntry

P1, P2, P3 = random_id(), random_id(), random_id()


def entry(node_id=P1, expires_at=None, endpoint="quic://h:1") -> ProviderEntry:
    return ProviderEntry(node_id, endpoint, {}, 300.0, 1, expires_at)


def test_defaults():
    assert DEFAULT_CACHE_TTL == 60.0
    c = DiscoveryCache()
    assert c.ttl == 60.0 and c.max_services == 10_000
    assert c.stats() == {
        "hits": 0,
        "misses": 0,
        "hit_ratio": 0.0,
        "services": 0,
        "evictions": 0,
        "dropped_full": 0,
    }


@pytest.mark.parametrize("kwargs", [{"ttl": -1}, {"ttl": float("nan")}, {"max_services": 0}])
def test_refuses_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        DiscoveryCache(**kwargs)


def test_miss_then_hit_counted():
    c = DiscoveryCache(ttl=60)
    assert c.get("svc", 0.0) is None
    c.put("svc", [entry(P1), entry(P2)], 0.0)
    got = c.get("svc", 1.0)
    assert [p.node_id for p in got] == [P1, P2]
    assert c.get("svc", 2.0) is not None
    s = c.stats()
    assert (s["hits"], s["misses"], s["services"]) == (2, 1, 1)
    assert s["hit_ratio"] == pytest.approx(2 / 3)


def test_returned_list_is_a_copy():
    c = DiscoveryCache()
    c.put("svc", [entry(P1)], 0.0)
    c.get("svc", 0.0).clear()
    assert len(c.get("svc", 0.0)) == 1


def test_entry_expires_after_cache_ttl():
    c = DiscoveryCache(ttl=60)
    c.put("svc", [entry(P1)], 100.0)
    assert c.get("svc", 159.9) is not None
    assert c.get("svc", 160.0) is None  # age >= ttl: a miss
    assert "svc" not in c
    assert c.stats()["misses"] == 1


def test_zero_ttl_disables_caching():
    c = DiscoveryCache(ttl=0)
    c.put("svc", [entry(P1)], 5.0)
    assert c.get("svc", 5.0) is None


def test_never_returns_expired_providers():
    c = DiscoveryCache(ttl=60)
    c.put("svc", [entry(P1, expires_at=10.0), entry(P2, expires_at=30.0), entry(P3)], 0.0)
    assert {p.node_id for p in c.get("svc", 5.0)} == {P1, P2, P3}
    assert {p.node_id for p in c.get("svc", 10.0)} == {P2, P3}  # P1 expired at 10
    assert {p.node_id for p in c.get("svc", 31.0)} == {P3}


def test_all_providers_expired_is_a_miss():
    c = DiscoveryCache(ttl=60)
    c.put("svc", [entry(P1, expires_at=10.0), entry(P2, expires_at=20.0)], 0.0)
    assert c.get("svc", 25.0) is None
    assert "svc" not in c
    assert c.stats()["misses"] == 1 and c.stats()["hits"] == 0


def test_put_skips_expired_and_empty():
    c = DiscoveryCache()
    c.put("svc", [entry(P1, expires_at=5.0), entry(P2, expires_at=50.0)], 10.0)
    assert [p.node_id for p in c.get("svc", 10.0)] == [P2]
    c.put("svc", [], 11.0)  # an empty answer replaces and caches nothing
    assert "svc" not in c
    c.put("other", [entry(P1, expires_at=5.0)], 10.0)
    assert "other" not in c


def test_put_replaces_and_restarts_age():
    c = DiscoveryCache(ttl=60)
    c.put("svc", [entry(P1)], 0.0)
    c.put("svc", [entry(P2)], 50.0)
    assert [p.node_id for p in c.get("svc", 100.0)] == [P2]


def test_evict_provider():
    c = DiscoveryCache()
    c.put("svc", [entry(P1), entry(P2)], 0.0)
    assert c.evict_provider("svc", P1) is True
    assert [p.node_id for p in c.get("svc", 1.0)] == [P2]
    assert c.evict_provider("svc", P1) is False  # already gone
    assert c.evict_provider("nope", P1) is False
    assert c.evict_provider("svc", P2) is True  # last one: the entry goes
    assert "svc" not in c
    assert c.get("svc", 1.0) is None
    assert c.stats()["evictions"] == 2


def test_invalidate_and_clear():
    c = DiscoveryCache()
    c.put("a", [entry(P1)], 0.0)
    c.put("b", [entry(P2)], 0.0)
    assert c.invalidate("a") is True and c.invalidate("a") is False
    assert c.get("a", 0.0) is None and c.get("b", 0.0) is not None
    c.clear()
    assert len(c) == 0
    assert c.stats()["hits"] == 1  # counters survive clear


def test_bounded_evicts_oldest():
    c = DiscoveryCache(ttl=60, max_services=3)
    for i, name in enumerate(["a", "b", "c"]):
        c.put(name, [entry(P1)], float(i))
    c.put("a", [entry(P1)], 3.0)  # refreshed: now the newest
    c.put("d", [entry(P1)], 4.0)
    assert len(c) == 3
    assert "b" not in c and {"a", "c", "d"} <= {r["service"] for r in c.snapshot(4.0)}
    assert c.stats()["dropped_full"] == 1


def test_bounded_large():
    c = DiscoveryCache(max_services=100)
    for i in range(1000):
        c.put(f"svc{i}", [entry(P1)], float(i) / 1000)
    assert len(c) == 100
    assert "svc999" in c and "svc899" not in c


def test_snapshot():
    c = DiscoveryCache(ttl=60)
    c.put("a", [entry(P1), entry(P2, expires_at=5.0)], 0.0)
    c.put("b", [entry(P3)], 20.0)
    rows = {r["service"]: r for r in c.snapshot(30.0)}
    assert rows["a"] == {"service": "a", "providers": 1, "age": 30.0, "expires_in": 30.0}
    assert rows["b"] == {"service": "b", "providers": 1, "age": 10.0, "expires_in": 50.0}
    assert [r["service"] for r in c.snapshot(70.0)] == ["b"]  # "a" is stale
    assert c.stats()["hits"] == 0 and c.stats()["misses"] == 0  # snapshot counts nothing
