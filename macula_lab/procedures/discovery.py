"""Service Discovery: the consumer finds the providers in the DHT, caches them, hits the cache."""

from __future__ import annotations

import time

from .context import Context
from .report import Check

GROUP = "Service Discovery"


async def discovery(ctx: Context) -> list[Check]:
    cfg = ctx.config
    consumer = ctx.node(ctx.consumer)
    expected = sorted(ctx.providers)

    async def complete():
        names = await ctx.provider_names(refresh=True)
        return names if names == expected else None

    await ctx.wait_for(complete, cfg.propagation_timeout, 0.1)  # propagation, before measuring
    before = await ctx.events(ctx.consumer, ("discovered",))
    t0 = time.perf_counter()
    entries = await consumer.discover(cfg.service, refresh=True)
    took_ms = (time.perf_counter() - t0) * 1000
    names = sorted(str(e.metadata.get("node") or e.node_id.hex()[:12]) for e in entries)
    discovered = await ctx.events(ctx.consumer, ("discovered",))
    # the answer must come from a lookup made now (a newer "discovered" event), not from the cache
    # (more events, or a newer one when the node's event log is full)
    queried = len(discovered) > len(before) or bool(
        discovered and before and discovered[-1]["at"] > before[-1]["at"]
    )
    hops = discovered[-1]["detail"].get("hops") if queried else None
    checks = [
        Check(
            GROUP,
            "Consumer finds provider via DHT query",
            bool(entries) and queried,
            round(took_ms, 2),
            "ms",
            f"{ctx.consumer} found {names} in the DHT in {took_ms:.1f} ms"
            + (f" ({hops} hop(s))" if hops is not None else "")
            + (
                f"; 0 hops: {ctx.consumer} is one of the k closest nodes to the key and answers"
                " from its own replica (every node is, in a mesh smaller than k)"
                if hops == 0
                else ""
            )
            + ("" if queried else f"; {ctx.consumer} made no DHT lookup (no new 'discovered' event)"),
        )
    ]

    snap = await ctx.inspect(ctx.consumer, ["cache"])
    row = next((e for e in snap["cache"]["entries"] if e["service"] == cfg.service), None)
    measured = None if row is None else row["age"] + row["expires_in"]
    ok = row is not None and row["providers"] == len(entries)
    if ok and cfg.cache_ttl is not None:
        ok = abs(measured - cfg.cache_ttl) <= max(0.02 * cfg.cache_ttl, 0.01)
    want = f" (expected {cfg.cache_ttl:g}s)" if cfg.cache_ttl is not None else ""
    checks.append(
        Check(
            GROUP,
            "Discovery result cached (60s TTL)",
            ok,
            None if measured is None else round(measured, 3),
            "s cache TTL",
            f"{ctx.consumer} caches {row['providers']} provider(s) of {cfg.service}, "
            f"expires in {row['expires_in']:.3g}s{want}"
            if row
            else f"{ctx.consumer} has no cache entry for {cfg.service} after the lookup",
        )
    )

    before = (await ctx.inspect(ctx.consumer, ["cache"]))["cache"]["stats"]
    results = [await consumer.call(cfg.service, cfg.args, timeout=cfg.call_timeout) for _ in range(2)]
    after = (await ctx.inspect(ctx.consumer, ["cache"]))["cache"]["stats"]
    hits = after["hits"] - before["hits"]
    lookups = hits + after["misses"] - before["misses"]
    checks.append(
        Check(
            GROUP,
            "Cache hit on subsequent calls",
            hits >= 1,
            round(hits / lookups, 3) if lookups else None,
            "hit ratio",
            f"{len(results)} calls after the lookup: {hits} cache hit(s), {lookups - hits} miss(es) "
            f"(served by {[r.provider for r in results]})",
        )
    )
    checks.append(
        Check(
            GROUP,
            "Multiple providers returned from DHT",
            names == expected and len(names) >= 2,
            len(names),
            "provider(s)",
            f"found {len(names)} providers for service {cfg.service} in DHT: {names} (expected {expected})",
        )
    )
    return checks
