import random
from collections import Counter

import pytest

from macula_lab.core.records import ProviderEntry
from macula_lab.core.selection import (
    STRATEGIES,
    FirstStrategy,
    LeastLoadedStrategy,
    LocalFirstStrategy,
    ProviderStats,
    RandomStrategy,
    RoundRobinStrategy,
    SelectionContext,
    Strategy,
    UnknownStrategy,
    make_strategy,
    register_strategy,
)
from macula_lab.errors import MaculaError

A, B, C = bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32
LOCAL = bytes([9]) * 32


def prov(node_id: bytes, endpoint: str | None = None) -> ProviderEntry:
    return ProviderEntry(node_id, endpoint or f"quic://{node_id[0]}:4433")


PROVIDERS = [prov(A), prov(B), prov(C)]


def ctx(seed: int = 1, stats: ProviderStats | None = None, endpoint: str = "quic://local:4433"):
    return SelectionContext(LOCAL, endpoint, stats or ProviderStats(), random.Random(seed))


# --------------------------------------------------------------- round robin
@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_round_robin_3_3_3(order):
    s, c = RoundRobinStrategy(), ctx()
    picks = [s.choose("svc", [PROVIDERS[i] for i in order], c).node_id for _ in range(9)]
    assert Counter(picks) == {A: 3, B: 3, C: 3}
    assert picks[:3] == [A, B, C]  # node-id order, whatever the discovery order


def test_round_robin_discovery_order_changing_between_calls():
    s, c = RoundRobinStrategy(), ctx()
    rng = random.Random(7)
    picks = []
    for _ in range(9):
        shuffled = PROVIDERS[:]
        rng.shuffle(shuffled)
        picks.append(s.choose("svc", shuffled, c).node_id)
    assert Counter(picks) == {A: 3, B: 3, C: 3}


def test_round_robin_counter_per_service():
    s, c = RoundRobinStrategy(), ctx()
    assert s.choose("x", PROVIDERS, c).node_id == A
    assert s.choose("y", PROVIDERS, c).node_id == A
    assert s.choose("x", PROVIDERS, c).node_id == B


def test_round_robin_after_failover_shrinks():
    s, c = RoundRobinStrategy(), ctx()
    s.choose("svc", PROVIDERS, c)  # counter 0 -> A
    # B excluded: index 1 of [A, C]
    assert s.choose("svc", [prov(A), prov(C)], c).node_id == C


# --------------------------------------------------------------------- first
def test_first_always_the_same():
    s, c = FirstStrategy(), ctx()
    picks = {
        s.choose("svc", order, c).node_id
        for order in (PROVIDERS, PROVIDERS[::-1], PROVIDERS[1:] + [PROVIDERS[0]])
    }
    assert picks == {A}


# --------------------------------------------------------------- local first
def test_local_first_prefers_own_node_id():
    s = LocalFirstStrategy()
    providers = [*PROVIDERS, prov(LOCAL, "quic://elsewhere:1")]
    for seed in range(10):
        assert s.choose("svc", providers, ctx(seed)).node_id == LOCAL


def test_local_first_then_local_endpoint():
    s = LocalFirstStrategy()
    attached = prov(B, "quic://local:4433")  # a client attached to this node
    for seed in range(10):
        assert s.choose("svc", [prov(A), attached, prov(C)], ctx(seed)) == attached


def test_local_first_falls_back_to_random():
    s = LocalFirstStrategy()
    picks = {s.choose("svc", PROVIDERS, ctx(seed)).node_id for seed in range(50)}
    assert picks == {A, B, C}


def test_local_first_empty_local_endpoint_matches_nothing():
    s = LocalFirstStrategy()
    providers = [prov(A, ""), prov(B, ""), prov(C, "")]
    picks = {s.choose("svc", providers, ctx(seed, endpoint="")).node_id for seed in range(50)}
    assert picks == {A, B, C}


# -------------------------------------------------------------- least loaded
def test_least_loaded_prefers_idle_over_busy():
    stats = ProviderStats()
    for _ in range(3):
        stats.started(A)
    stats.started(B)
    stats.finished(B, 0.001, ok=True)  # B idle again and fast
    stats.started(C)  # C busy
    s = LeastLoadedStrategy()
    assert s.choose("svc", PROVIDERS, ctx(stats=stats)).node_id == B


def test_least_loaded_lower_latency_among_idle():
    stats = ProviderStats()
    for node_id, latency in [(A, 0.050), (B, 0.010), (C, 0.030)]:
        stats.started(node_id)
        stats.finished(node_id, latency, ok=True)
    assert LeastLoadedStrategy().choose("svc", PROVIDERS, ctx(stats=stats)).node_id == B


def test_least_loaded_tries_unmeasured_provider():
    stats = ProviderStats()
    stats.started(A)
    stats.finished(A, 0.001, ok=True)
    assert LeastLoadedStrategy().choose("svc", [prov(A), prov(C)], ctx(stats=stats)).node_id == C


def test_least_loaded_ties_by_node_id():
    assert LeastLoadedStrategy().choose("svc", PROVIDERS[::-1], ctx()).node_id == A


# -------------------------------------------------------------------- random
def test_random_covers_all_and_is_reproducible():
    s = RandomStrategy()
    c1, c2 = ctx(seed=42), ctx(seed=42)
    run1 = [s.choose("svc", PROVIDERS, c1).node_id for _ in range(300)]
    run2 = [s.choose("svc", PROVIDERS[::-1], c2).node_id for _ in range(300)]
    assert run1 == run2  # same seed, same choices whatever the order
    counts = Counter(run1)
    assert set(counts) == {A, B, C}
    assert all(60 < n < 140 for n in counts.values())


def test_empty_providers_refused():
    for factory in STRATEGIES.values():
        with pytest.raises(ValueError):
            factory().choose("svc", [], ctx())


# --------------------------------------------------------------------- stats
def test_stats_bookkeeping():
    stats = ProviderStats()
    stats.record_selection(A)
    stats.started(A)
    assert stats.get(A).in_flight == 1 and stats.get(A).calls == 1
    stats.finished(A, 0.100, ok=True)
    assert stats.get(A).latency_ewma == pytest.approx(0.100)
    stats.started(A)
    stats.finished(A, 0.200, ok=True)
    assert stats.get(A).latency_ewma == pytest.approx(0.3 * 0.2 + 0.7 * 0.1)
    stats.started(A)
    stats.finished(A, 5.0, ok=False)  # failures do not feed the latency
    a = stats.get(A)
    assert (a.in_flight, a.calls, a.failures, a.selected) == (0, 3, 1, 1)
    assert a.latency_ewma == pytest.approx(0.13)
    stats.finished(A, None, ok=True)  # unmatched finish: clamped, no latency
    assert stats.get(A).in_flight == 0


def test_stats_get_unknown_is_zero_and_not_stored():
    stats = ProviderStats()
    s = stats.get(B)
    assert (s.in_flight, s.latency_ewma, s.calls, s.failures, s.selected) == (0, None, 0, 0, 0)
    assert B not in stats and len(stats) == 0


def test_stats_selection_counts_and_snapshot():
    stats = ProviderStats()
    s, c = RoundRobinStrategy(), ctx(stats=stats)
    for _ in range(9):
        stats.record_selection(s.choose("svc", PROVIDERS, c).node_id)
    assert stats.selection_counts() == {A: 3, B: 3, C: 3}
    stats.started(A)
    stats.finished(A, 0.002, ok=True)
    row = next(r for r in stats.snapshot() if r["node_id"] == A.hex())
    assert row == {
        "node_id": A.hex(),
        "in_flight": 0,
        "latency_ms": pytest.approx(2.0),
        "calls": 1,
        "failures": 0,
        "selected": 3,
        "suspect_for": 0.0,
    }
    assert next(r for r in stats.snapshot() if r["node_id"] == B.hex())["latency_ms"] is None


def test_stats_bounded_lru():
    stats = ProviderStats(max_entries=3)
    stats.started(A)
    stats.started(B)
    stats.started(C)
    stats.record_selection(A)  # A is now the most recently used
    stats.started(LOCAL)
    assert len(stats) == 3
    assert B not in stats and A in stats and LOCAL in stats


# ------------------------------------------------------------------ registry
def test_builtin_names():
    assert set(STRATEGIES) >= {"random", "round_robin", "first", "local_first", "least_loaded"}
    for name in ["random", "round_robin", "first", "local_first", "least_loaded"]:
        s = make_strategy(name)
        assert s.name == name and isinstance(s, Strategy)


def test_make_strategy_fresh_instances_and_passthrough():
    a, b = make_strategy("round_robin"), make_strategy("round_robin")
    assert a is not b  # counters are not shared
    assert make_strategy(a) is a


def test_unknown_strategy():
    with pytest.raises(UnknownStrategy) as info:
        make_strategy("round-robin")
    err = info.value
    assert isinstance(err, MaculaError) and isinstance(err, ValueError)
    assert err.code == "invalid_field" and err.field == "strategy"
    assert "round_robin" in str(err) and "least_loaded" in str(err)
    assert "round_robin" in err.known


@pytest.mark.parametrize("bad", [None, 3, RoundRobinStrategy])
def test_make_strategy_refuses_non_strategies(bad):
    with pytest.raises(TypeError):
        make_strategy(bad)


def test_custom_registered_strategy():
    class Last:
        name = "last"

        def choose(self, service, providers, ctx):
            return max(providers, key=lambda p: p.node_id)

    register_strategy("last", Last)
    try:
        s = make_strategy("last")
        assert s.name == "last"
        assert s.choose("svc", PROVIDERS, ctx()).node_id == C
    finally:
        del STRATEGIES["last"]
    with pytest.raises(UnknownStrategy):
        make_strategy("last")


@pytest.mark.parametrize("name,factory", [("", RandomStrategy), (None, RandomStrategy), ("x", 42)])
def test_register_strategy_validates(name, factory):
    with pytest.raises((ValueError, TypeError)):
        register_strategy(name, factory)
    assert "x" not in STRATEGIES


# ------------------------------------------------------------ negative caching
def test_a_failed_provider_is_suspect_for_a_growing_backoff_and_trusted_again_after_a_success():
    from macula_lab.core.selection import SUSPECT_FOR, SUSPECT_MAX

    stats = ProviderStats()
    a = b"\x01" * 32
    assert not stats.suspect(a, 0.0)
    stats.begin(a)
    stats.finished(a, None, ok=False, now=100.0)
    assert stats.suspect(a, 100.0 + SUSPECT_FOR - 0.01) and not stats.suspect(a, 100.0 + SUSPECT_FOR)
    stats.begin(a)
    stats.finished(a, None, ok=False, now=200.0)  # again: twice as long
    assert stats.suspect(a, 200.0 + 2 * SUSPECT_FOR - 0.01)
    for i in range(10):
        stats.begin(a)
        stats.finished(a, None, ok=False, now=300.0 + i)
    assert stats.suspect(a, 309.0 + SUSPECT_MAX - 0.01) and not stats.suspect(a, 309.0 + SUSPECT_MAX)
    stats.begin(a)
    stats.finished(a, 0.001, ok=True)
    assert not stats.suspect(a, 310.0)  # a success clears it
    assert stats.snapshot()[0]["failures"] == 12
