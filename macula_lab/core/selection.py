"""Provider selection: which provider of a service a call goes to.

Strategies are small objects with a ``name`` and a pure
``choose(service, providers, ctx)``; the runtime filters out excluded
(failed) providers first, then asks the strategy, then records the choice with
``ctx.stats.record_selection(node_id)`` and the call's outcome with
:meth:`ProviderStats.started` / :meth:`ProviderStats.finished`.

Built-in strategies (the reference's ``first``/``random``/``round_robin`` plus
the ``local_first`` and ``least_loaded`` it only planned):

============== ===========================================================
random         uniform choice with ``ctx.rng`` (the default)
round_robin    per-service counter over the providers in node-id order
first          always the provider with the lowest node id
local_first    this node (or a client attached to it) if it provides, else random
least_loaded   fewest calls in flight, then lowest latency EWMA, then node id
============== ===========================================================

Strategies order providers by node id before choosing, so the result does not
depend on the order discovery happened to return them in.  More strategies can
be added with :func:`register_strategy`; an unknown name is an error
(:class:`UnknownStrategy`), never a silent fallback to random as in the
reference.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import InvalidField
from .records import ProviderEntry

LATENCY_ALPHA = 0.3
DEFAULT_MAX_PROVIDERS = 10_000
#: services a round-robin strategy keeps counters for
MAX_ROUND_ROBIN_SERVICES = 10_000


class UnknownStrategy(InvalidField):
    """A provider selection strategy name that is not registered (``field`` is ``strategy``)."""

    def __init__(self, name: object, known: Sequence[str]):
        self.name = name
        self.known = sorted(known)
        super().__init__(
            f"strategy: unknown provider selection strategy {name!r}; known: {', '.join(self.known)}",
            field="strategy",
        )


# ---------------------------------------------------------------- statistics
#: after a failed attempt a provider is *suspect* this long, doubled for each failure in a
#: row up to SUSPECT_MAX: calls skip it while another provider is known (negative caching),
#: so a dead provider still listed in the DHT costs one timeout, not one per call
SUSPECT_FOR = 5.0
SUSPECT_MAX = 60.0


@dataclass(slots=True)
class ProviderStat:
    """What a caller has seen of one provider."""

    in_flight: int = 0
    latency_ewma: float | None = None  # seconds, successful calls only
    calls: int = 0
    failures: int = 0
    selected: int = 0
    failures_in_a_row: int = 0
    suspect_until: float = 0.0  # (clock of the caller) see SUSPECT_FOR


class ProviderStats:
    """Per-provider counters of one caller, at most ``max_entries`` providers (LRU)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_PROVIDERS) -> None:
        self.max_entries = max_entries
        self._stats: OrderedDict[bytes, ProviderStat] = OrderedDict()

    def _touch(self, node_id: bytes) -> ProviderStat:
        stat = self._stats.get(node_id)
        if stat is None:
            stat = self._stats[node_id] = ProviderStat()
            while len(self._stats) > self.max_entries:
                self._stats.popitem(last=False)
        else:
            self._stats.move_to_end(node_id)
        return stat

    def started(self, node_id: bytes) -> None:
        """A call to ``node_id`` was sent."""
        stat = self._touch(node_id)
        stat.in_flight += 1
        stat.calls += 1

    def finished(self, node_id: bytes, latency: float | None, ok: bool, now: float | None = None) -> None:
        """A call to ``node_id`` ended; ``latency`` (s) feeds the EWMA when ``ok``.

        A failure at ``now`` makes the provider suspect (see :data:`SUSPECT_FOR`); a success clears it.
        """
        stat = self._touch(node_id)
        # clamp: the entry may have been dropped (LRU) while the call was in flight
        stat.in_flight = max(0, stat.in_flight - 1)
        if not ok:
            stat.failures += 1
            stat.failures_in_a_row += 1
            if now is not None:
                backoff = min(SUSPECT_MAX, SUSPECT_FOR * 2 ** (stat.failures_in_a_row - 1))
                stat.suspect_until = now + backoff
            return
        if stat.failures_in_a_row:
            stat.failures_in_a_row = 0
            stat.suspect_until = 0.0
        if latency is not None:
            if stat.latency_ewma is None:
                stat.latency_ewma = latency
            else:
                stat.latency_ewma = LATENCY_ALPHA * latency + (1 - LATENCY_ALPHA) * stat.latency_ewma

    def begin(self, node_id: bytes) -> None:
        """``node_id`` was chosen and the call sent: record_selection + started in one step (hot path)."""
        stat = self._touch(node_id)
        stat.selected += 1
        stat.in_flight += 1
        stat.calls += 1

    def suspect(self, node_id: bytes, now: float) -> bool:
        """Whether ``node_id`` failed recently enough to be skipped while others are known."""
        stat = self._stats.get(node_id)
        return stat is not None and stat.suspect_until > now

    def record_selection(self, node_id: bytes) -> None:
        """A strategy chose ``node_id`` (counted by the runtime, strategies stay pure)."""
        self._touch(node_id).selected += 1

    def get(self, node_id: bytes) -> ProviderStat:
        """The provider's counters; a fresh zeroed (unstored) record if never seen.

        Treat the result as read-only: reading does not create or refresh an entry.
        """
        stat = self._stats.get(node_id)
        return stat if stat is not None else ProviderStat()

    def __len__(self) -> int:
        return len(self._stats)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._stats

    def selection_counts(self) -> dict[bytes, int]:
        return {node_id: stat.selected for node_id, stat in self._stats.items()}

    def snapshot(self) -> list[dict[str, Any]]:
        """Rows for the lab views (latency in milliseconds)."""
        return [
            {
                "node_id": node_id.hex(),
                "in_flight": stat.in_flight,
                "latency_ms": None if stat.latency_ewma is None else stat.latency_ewma * 1000.0,
                "calls": stat.calls,
                "failures": stat.failures,
                "selected": stat.selected,
                "suspect_for": stat.suspect_until,  # (the caller's clock; the inspector makes it relative)
            }
            for node_id, stat in self._stats.items()
        ]


# ---------------------------------------------------------------- strategies
@dataclass
class SelectionContext:
    """What a strategy may look at besides the providers."""

    local_id: bytes
    local_endpoint: str
    stats: ProviderStats = field(default_factory=ProviderStats)
    rng: random.Random = field(default_factory=random.Random)


@runtime_checkable
class Strategy(Protocol):
    name: str

    def choose(
        self, service: str, providers: Sequence[ProviderEntry], ctx: SelectionContext
    ) -> ProviderEntry:
        """One of ``providers`` (non-empty, excluded providers already removed)."""
        ...


def _by_id(providers: Sequence[ProviderEntry]) -> Sequence[ProviderEntry]:
    if not providers:
        raise ValueError("no provider to choose from")
    if len(providers) == 1:
        return providers
    return sorted(providers, key=_node_id)


def _node_id(p: ProviderEntry) -> bytes:
    return p.node_id


class RandomStrategy:
    name = "random"

    def choose(
        self, service: str, providers: Sequence[ProviderEntry], ctx: SelectionContext
    ) -> ProviderEntry:
        # sorted first: a seeded rng gives the same choices whatever the discovery order
        return ctx.rng.choice(_by_id(providers))


class RoundRobinStrategy:
    """Per-service counter; the k-th call goes to provider ``k % n`` in node-id order.

    After a failover the list is shorter and the index applies to it, as in the
    reference.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._counters: dict[str, int] = {}

    def choose(
        self, service: str, providers: Sequence[ProviderEntry], ctx: SelectionContext
    ) -> ProviderEntry:
        ordered = _by_id(providers)
        counter = self._counters.pop(service, 0)
        self._counters[service] = counter + 1  # re-inserted: dict order is recency order
        if len(self._counters) > MAX_ROUND_ROBIN_SERVICES:
            del self._counters[next(iter(self._counters))]
        return ordered[counter % len(ordered)]


class FirstStrategy:
    """Always the provider with the lowest node id: the same one every time."""

    name = "first"

    def choose(
        self, service: str, providers: Sequence[ProviderEntry], ctx: SelectionContext
    ) -> ProviderEntry:
        return _by_id(providers)[0]


class LocalFirstStrategy:
    """This node if it provides the service, else a client attached to it, else random."""

    name = "local_first"

    def choose(
        self, service: str, providers: Sequence[ProviderEntry], ctx: SelectionContext
    ) -> ProviderEntry:
        ordered = _by_id(providers)
        for p in ordered:
            if p.node_id == ctx.local_id:
                return p  # served in this process: no network at all
        if ctx.local_endpoint:
            # attached clients advertise with the endpoint of the node they use
            local = [p for p in ordered if p.endpoint == ctx.local_endpoint]
            if local:
                return ctx.rng.choice(local)
        return ctx.rng.choice(ordered)


class LeastLoadedStrategy:
    """Fewest calls in flight, then lowest latency EWMA, then lowest node id.

    A provider never measured counts as latency 0, so new providers get tried
    (and measured) rather than starved by a known-fast one.
    """

    name = "least_loaded"

    def choose(
        self, service: str, providers: Sequence[ProviderEntry], ctx: SelectionContext
    ) -> ProviderEntry:
        def load(p: ProviderEntry) -> tuple[int, float, bytes]:
            stat = ctx.stats.get(p.node_id)
            latency = stat.latency_ewma if stat.latency_ewma is not None else 0.0
            return (stat.in_flight, latency, p.node_id)

        return min(_by_id(providers), key=load)


# ------------------------------------------------------------------ registry
STRATEGIES: dict[str, Callable[[], Strategy]] = {
    RandomStrategy.name: RandomStrategy,
    RoundRobinStrategy.name: RoundRobinStrategy,
    FirstStrategy.name: FirstStrategy,
    LocalFirstStrategy.name: LocalFirstStrategy,
    LeastLoadedStrategy.name: LeastLoadedStrategy,
}
DEFAULT_STRATEGY = RandomStrategy.name


def register_strategy(name: str, factory: Callable[[], Strategy]) -> None:
    """Make ``name`` usable wherever a strategy name is accepted (replaces an existing one)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"strategy name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"strategy factory must be callable, got {factory!r}")
    STRATEGIES[name] = factory


def check_strategy(name: object, field: str = "strategy") -> str:
    """A registered strategy name, or :class:`UnknownStrategy` (an :class:`InvalidField`)."""
    if not isinstance(name, str) or name not in STRATEGIES:
        raise UnknownStrategy(name, list(STRATEGIES))
    return name


def make_strategy(name_or_strategy: str | Strategy) -> Strategy:
    """A new strategy instance for a registered name, or the given instance itself.

    Instances carry state (round-robin counters): keep the one you get for as
    long as the counters should persist (per node, or per call override).
    """
    if isinstance(name_or_strategy, str):
        factory = STRATEGIES.get(name_or_strategy)
        if factory is None:
            raise UnknownStrategy(name_or_strategy, list(STRATEGIES))
        return factory()
    if isinstance(name_or_strategy, Strategy) and not isinstance(name_or_strategy, type):
        return name_or_strategy
    raise TypeError(f"expected a strategy name or a Strategy, got {type(name_or_strategy).__name__}")
