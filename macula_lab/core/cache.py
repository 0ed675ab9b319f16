"""Discovery cache: service name -> providers found in the DHT, for ``ttl`` seconds.

Like the reference's service registry cache (60 s by default, an entry of age
>= ttl is a miss, so ``ttl=0`` disables caching), with what it lacked:

* a hit never returns a provider entry whose own TTL has run out (the
  reference could hand out providers long dead); if none is left the lookup is
  a miss, so the caller asks the DHT again instead of failing;
* empty provider lists are not cached (a service advertised a moment later is
  found on the next call, not after the cache TTL);
* failover can evict one dead provider (:meth:`DiscoveryCache.evict_provider`);
* bounded size: past ``max_services`` the oldest entry goes.

Sans-I/O: every method that reads the clock takes ``now``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .params import DEFAULT_CACHE_TTL, check_cache_ttl
from .records import ProviderEntry

DEFAULT_MAX_SERVICES = 10_000


@dataclass(slots=True)
class _Cached:
    providers: tuple[ProviderEntry, ...]
    cached_at: float
    first_expiry: float = math.inf  # before this, every provider is live: no filtering needed

    def __post_init__(self) -> None:
        self.first_expiry = min(
            (p.expires_at for p in self.providers if p.expires_at is not None), default=math.inf
        )


class DiscoveryCache:
    """service -> providers, each entry valid ``ttl`` seconds after :meth:`put`."""

    def __init__(self, ttl: float = DEFAULT_CACHE_TTL, max_services: int = DEFAULT_MAX_SERVICES) -> None:
        check_cache_ttl(ttl)
        if max_services < 1:
            raise ValueError(f"max_services must be >= 1, got {max_services!r}")
        self.ttl = float(ttl)
        self.max_services = max_services
        # insertion order == age order (put moves an entry to the end)
        self._entries: OrderedDict[str, _Cached] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._evictions = 0  # providers removed by evict_provider (failover)
        self._dropped_full = 0  # entries dropped to respect max_services

    def get(self, service: str, now: float) -> list[ProviderEntry] | None:
        """The cached providers still live at ``now``, or None (a miss: ask the DHT)."""
        cached = self._entries.get(service)
        if cached is None:
            self._misses += 1
            return None
        if now - cached.cached_at >= self.ttl:
            del self._entries[service]
            self._misses += 1
            return None
        if now < cached.first_expiry:  # the common case: nothing to filter, nothing to copy
            self._hits += 1
            return list(cached.providers)
        live = tuple(p for p in cached.providers if p.live(now))
        if not live:
            # every provider expired: a cached "nothing" would hide new providers
            del self._entries[service]
            self._misses += 1
            return None
        if len(live) != len(cached.providers):
            cached.providers = live
            cached.__post_init__()
        self._hits += 1
        return list(live)

    def put(self, service: str, providers: list[ProviderEntry], now: float) -> None:
        """Cache ``providers`` (already-expired ones skipped); an empty list caches nothing."""
        live = tuple(p for p in providers if p.live(now))
        self._entries.pop(service, None)
        if not live:
            return
        self._entries[service] = _Cached(live, now)
        while len(self._entries) > self.max_services:
            self._entries.popitem(last=False)
            self._dropped_full += 1

    def evict_provider(self, service: str, node_id: bytes) -> bool:
        """Forget one provider of ``service`` (it failed); True if it was cached."""
        cached = self._entries.get(service)
        if cached is None:
            return False
        kept = tuple(p for p in cached.providers if p.node_id != node_id)
        if len(kept) == len(cached.providers):
            return False
        self._evictions += 1
        if kept:
            cached.providers = kept
            cached.__post_init__()
        else:
            del self._entries[service]
        return True

    def invalidate(self, service: str) -> bool:
        """Drop the entry of ``service``; True if there was one."""
        return self._entries.pop(service, None) is not None

    def clear(self) -> None:
        """Drop every entry (the counters are kept)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, service: object) -> bool:
        return service in self._entries

    def stats(self) -> dict[str, Any]:
        lookups = self._hits + self._misses
        return {
            "hits": self._hits,
            "misses": self._misses,
            "hit_ratio": self._hits / lookups if lookups else 0.0,
            "services": len(self._entries),
            "evictions": self._evictions,
            "dropped_full": self._dropped_full,
        }

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Rows for the lab views: one per still-valid entry (no counters touched)."""
        rows = []
        for service, cached in self._entries.items():
            age = now - cached.cached_at
            if age >= self.ttl:
                continue
            rows.append(
                {
                    "service": service,
                    "providers": sum(1 for p in cached.providers if p.live(now)),
                    "age": age,
                    "expires_in": self.ttl - age,
                }
            )
        return rows
