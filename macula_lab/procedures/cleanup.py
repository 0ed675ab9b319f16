"""Cleanup: unadvertise removes the provider from the DHT, cancels its timer, leaves nothing behind."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .context import Context
from .report import Check

GROUP = "Cleanup"


async def take_baseline(ctx: Context) -> None:
    """Gauges of every node before the checklist advertises anything (for the orphan check)."""
    for n in ctx.lab.running_nodes():
        snap = await ctx.inspect(n.name, ["metrics", "events"])
        ctx.baseline[n.name] = dict(snap["metrics"]["gauges"])
        ctx.cursor[n.name] = max((e["at"] for e in snap["events"]), default=0.0)


async def cleanup(ctx: Context) -> list[Check]:
    cfg = ctx.config
    removed: dict[str, int] = {}
    before = await ctx.record_holders()
    stored = {r["metadata"].get("node") for rows in before.values() for r in rows}
    t_unadv = time.time()
    for p in list(ctx.advertised):
        removed[p] = await ctx.node(p).unadvertise(cfg.service)
        ctx.advertised.discard(p)
        ctx.progress.note(f"{p} unadvertised {cfg.service}: removed from {removed[p]} node(s)")

    left = await ctx.provider_names(refresh=True)
    holders = await ctx.record_holders()
    # a provider whose records had already expired has nothing left to remove
    ok = bool(removed) and not left and not holders and all(v >= 1 for p, v in removed.items() if p in stored)
    checks = [
        Check(
            GROUP,
            "Unadvertise removes from DHT",
            ok,
            sum(removed.values()),
            "record(s) removed",
            f"records removed per provider {removed} (stored before: {sorted(stored)}); the DHT now returns {left or 'no provider'}; "
            f"records left on {sorted(holders) or 'no node'}",
        )
    ]

    rows = {p: await ctx.advertisement(p) for p in ctx.providers}
    if cfg.confirm_cancel:  # one full interval: a surviving timer would fire in it
        await asyncio.sleep(max(0.0, t_unadv + cfg.interval * (1 + cfg.tolerance) - time.time()))
    late: dict[str, int] = {}
    unadv: dict[str, bool] = {}
    for p in ctx.providers:
        events = await ctx.events(p, ("readvertised", "unadvertised"))
        stops = [e["at"] for e in events if e["kind"] == "unadvertised"]  # node clock: compare with its own
        stop = stops[-1] if stops else None
        unadv[p] = stop is not None
        late[p] = sum(
            1 for e in events if e["kind"] == "readvertised" and stop is not None and e["at"] > stop
        )
    ok = all(rows[p] is None and unadv[p] and late[p] == 0 for p in ctx.providers)
    checks.append(
        Check(
            GROUP,
            "Timer cancelled on unadvertise",
            ok,
            sum(late.values()),
            "fire(s) after unadvertise",
            "; ".join(
                f"{p}: timer {'gone' if rows[p] is None else 'STILL ARMED'}, "
                f"unadvertised event {'yes' if unadv[p] else 'no'}, {late[p]} fire(s) after"
                for p in ctx.providers
            )
            + (f" (watched {cfg.interval * (1 + cfg.tolerance):.2g}s)" if cfg.confirm_cancel else ""),
        )
    )

    checks.append(await _orphans(ctx))
    return checks


async def _orphans(ctx: Context) -> Check:
    """Tasks back to the baseline, no call in flight, no advertisement left, no background error."""

    async def leftovers() -> dict[str, Any]:
        out = {}
        for name, base in ctx.baseline.items():
            if not ctx.lab.node(name).running:
                continue
            snap = await ctx.inspect(name, ["node", "metrics"])
            g = snap["metrics"]["gauges"]
            extra = {
                "tasks": g["tasks"] - base["tasks"],
                "pending_calls": g["pending_calls"],
                "advertised_services": g["advertised_services"] - base["advertised_services"],
            }
            extra = {k: v for k, v in extra.items() if v > 0}
            if extra:
                out[name] = extra
        return out

    async def timers() -> list[str]:
        """Re-advertisement timers of the checklist's service still alive anywhere (orphans)."""
        alive = []
        for handle in ctx.lab.running_nodes():
            snap = await ctx.inspect(handle.name, ["node"])
            if ctx.config.service in snap["node"].get("readvertise_timers", []):
                alive.append(f"{handle.name}:{ctx.config.service}")
        return alive

    # lookups and pings finish within a request timeout: give transient tasks a moment
    clean = await ctx.wait_for(lambda: _none(leftovers), 2.0, 0.1)
    left = {} if clean else await leftovers()
    local_timers = await timers()
    errors = list(ctx.lab.errors)
    ok = not left and not local_timers and not errors
    parts = [f"{n}: {d}" for n, d in left.items()]
    parts += [f"timer task alive: {t}" for t in local_timers]
    parts += [f"background error in {e['where']}: {e['error']}" for e in errors]
    return Check(
        GROUP,
        "No orphaned processes or timers",
        ok,
        sum(sum(d.values()) for d in left.values()) + len(local_timers),
        "left over",
        "; ".join(parts)
        or f"tasks, calls and advertisements back to their baseline on {sorted(ctx.baseline)}",
    )


async def _none(fn):
    """True when ``fn()`` returns an empty result (for Context.wait_for)."""
    return not await fn()
