"""Service Advertisement: publish from every provider, timer scheduled, several providers of one name.

The fourth box ("Re-advertisement happens before TTL expiry") needs the TTL to
pass, so :mod:`.readvertisement` measures it and files it under this group.
"""

from __future__ import annotations

import time

from .context import Context
from .report import Check

GROUP = "Service Advertisement"


async def advertise_all(ctx: Context) -> list[Check]:
    cfg = ctx.config
    checks: list[Check] = []
    already = await ctx.provider_names(refresh=True)
    if already:
        return [
            Check(
                GROUP,
                "Service published to DHT successfully",
                False,
                evidence=f"{cfg.service} is already provided by {already} before the checklist: "
                "give the checklist a service name of its own (parameter service)",
            )
        ]
    replicas: dict[str, int] = {}
    first = ctx.providers[0]
    held_by: list[str] = []
    for name in ctx.providers:
        replicas[name] = await ctx.node(name).advertise(cfg.service, ctx.handler(name), ttl=cfg.ttl)
        if name == first:
            # the acknowledged replicas hold the record once advertise returned; looked at before
            # a re-advertisement could store it (a publication acknowledged but never stored fails)
            holders = await ctx.record_holders()
            held_by = sorted(
                n for n, rows in holders.items() if any(r["metadata"].get("node") == first for r in rows)
            )
        ctx.published_at.setdefault(name, time.time())
        ctx.advertised.add(name)
        ctx.progress.note(
            f"{name} advertised {cfg.service} (ttl {cfg.ttl:g}s): stored on {replicas[name]} node(s)"
        )

    published = await ctx.events(first, ("published",))
    ok = replicas[first] >= 1 and bool(published) and bool(held_by)
    checks.append(
        Check(
            GROUP,
            "Service published to DHT successfully",
            ok,
            replicas[first],
            "replica(s)",
            f"{first}: published {cfg.service} replicas={replicas[first]} ttl={cfg.ttl:g}s, "
            f"record held by {held_by or 'no node'}"
            + ("" if published else "; no 'published' event on the provider"),
        )
    )

    scheduled = await ctx.events(first, ("readvertise_scheduled",))
    row = await ctx.advertisement(first)
    ok = (
        row is not None
        and abs(row["interval"] - cfg.interval) < 1e-6 + 0.001 * cfg.interval
        and 0 < row["next_fire_in"] <= cfg.interval
        and bool(scheduled)
    )
    evidence = (
        f"{first}: re-advertisement of {cfg.service} every {row['interval']:.3g}s "
        f"(0.8 x ttl {cfg.ttl:g}s), next in {row['next_fire_in']:.3g}s"
        if row
        else f"{first} shows no timer for {cfg.service}"
    )
    checks.append(
        Check(
            GROUP,
            "Re-advertisement timer scheduled",
            ok,
            None if row is None else round(row["interval"], 3),
            "s interval",
            evidence + ("" if scheduled else "; no 'readvertise_scheduled' event"),
        )
    )

    async def all_stored():
        holders = await ctx.record_holders()
        seen = {r["metadata"].get("node") for rows in holders.values() for r in rows}
        return seen if seen >= set(ctx.providers) else None

    seen = await ctx.wait_for(all_stored, cfg.propagation_timeout, 0.1)
    holders = await ctx.record_holders()
    per_provider = {
        p: sorted(n for n, rows in holders.items() if any(r["metadata"].get("node") == p for r in rows))
        for p in ctx.providers
    }
    ok = len(ctx.providers) >= 2 and bool(seen) and all(replicas[p] >= 1 for p in ctx.providers)
    checks.append(
        Check(
            GROUP,
            "Multiple providers can advertise same service",
            ok,
            len({p for p, h in per_provider.items() if h}),
            "provider(s) stored",
            "; ".join(f"{p}: records on {h or 'no node'}" for p, h in per_provider.items())
            + ("" if len(ctx.providers) >= 2 else " (the checklist needs 2 providers)"),
        )
    )
    return checks
