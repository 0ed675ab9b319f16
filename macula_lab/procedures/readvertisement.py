"""Re-advertisement: the timer fires at 0.8 x TTL, republishes, schedules the next, and goes on.

Waits until every provider has re-advertised ``readvertise_cycles`` times (or
the time for that plus a margin has passed), then judges from the providers'
own events and timers.  Also measures the Service Advertisement box
"Re-advertisement happens before TTL expiry": every gap between two
publications is shorter than the TTL, and a fresh DHT lookup made after more
than one TTL still finds every provider (its first record would have expired).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from .advertisement import GROUP as ADVERTISEMENT
from .context import Context
from .report import Check

if TYPE_CHECKING:
    from ..lab.lab import Lab

GROUP = "Re-advertisement"


def late_and_lapsed(
    rows: dict[str, dict[str, Any] | None], tolerance: float
) -> tuple[dict[str, float], dict[str, float]]:
    """From the timers' own rows (every fire since advertise, not only those the step watched):

    - late: provider -> its worst lateness (s), where it exceeds ``tolerance`` x the interval;
    - lapsed: provider -> how long its record was expired before being republished (s).

    The timer schedules the next fire from the actual one, so the longest gap between two
    publications is ``interval + lateness_max``; beyond the TTL the record had expired.
    """
    late, lapsed = {}, {}
    for p, row in rows.items():
        worst = row.get("lateness_max") if row else None
        if worst is None:
            continue
        if worst > tolerance * row["interval"]:
            late[p] = worst
        if row["interval"] + worst > row["ttl"]:
            lapsed[p] = row["interval"] + worst - row["ttl"]
    return late, lapsed


def _anomalies(late: dict[str, float], lapsed: dict[str, float]) -> str:
    return "".join(
        [f"; {p} fired {v * 1000:.0f} ms late" for p, v in late.items()]
        + [f"; {p}'s record lapsed {v * 1000:.0f} ms before it was republished" for p, v in lapsed.items()]
    )


async def readvertisement_kept(lab: Lab, service: str, providers: list[str], *, tolerance: float = 0.25) -> Check:
    """The testing guide's "Re-advertisement happens before TTL expiry" over a whole experiment.

    For providers advertising while something else runs (05's calls): none fired later
    than ``tolerance`` x the interval, none let its record lapse, each fired at least once.
    """
    rows: dict[str, dict[str, Any] | None] = {}
    for p in providers:
        snap = await lab.node(p).inspect(["advertisements"])
        rows[p] = next((a for a in snap.get("advertisements") or [] if a["service"] == service), None)
    late, lapsed = late_and_lapsed(rows, tolerance)
    never = [p for p, r in rows.items() if not r or not r["count"]]
    margins = [r["ttl"] - r["interval"] - r["lateness_max"] for r in rows.values() if r and r["count"]]
    return Check(
        ADVERTISEMENT,
        "Re-advertisement happens before TTL expiry",
        not late and not lapsed and not never,
        round(min(margins), 3) if margins else None,
        "s margin before expiry (min)",
        ", ".join(
            f"{p}: {r['count']} fire(s), lateness max {r['lateness_max'] * 1000:.0f} ms" if r and r["count"]
            else f"{p}: never re-advertised"
            for p, r in rows.items()
        )
        + f" (interval {next((r['interval'] for r in rows.values() if r), 0):.3g}s, late beyond "
        f"{tolerance:g} x interval fails)"
        + _anomalies(late, lapsed),
    )


async def readvertisement(ctx: Context) -> list[Check]:
    cfg = ctx.config
    interval = cfg.interval
    slack = cfg.tolerance * interval + 1.0
    first = min(ctx.published_at.values(), default=time.time())
    deadline = max(ctx.published_at.values(), default=time.time()) + cfg.readvertise_cycles * interval + slack
    counts: dict[str, int] = dict.fromkeys(ctx.providers, 0)
    rows: dict[str, dict | None] = {}
    while True:
        for p in ctx.providers:
            row = await ctx.advertisement(p)
            rows[p] = row
            count = row["count"] if row else 0
            if count != counts[p]:
                counts[p] = count
                ctx.progress.note(
                    f"{p}: re-advertisement {count}/{cfg.readvertise_cycles} of {cfg.service}"
                    + (f", next in {row['next_fire_in']:.2f}s" if row else "")
                )
        done = all(c >= cfg.readvertise_cycles for c in counts.values())
        if (done and time.time() > first + cfg.ttl + 0.2) or time.time() > deadline:
            break
        await asyncio.sleep(min(0.2, interval / 4))

    publications: dict[str, list[dict]] = {}
    for p in ctx.providers:
        publications[p] = sorted(await ctx.events(p, ("published", "readvertised")), key=lambda e: e["at"])
    gaps = {
        p: [b["at"] - a["at"] for a, b in zip(ev, ev[1:], strict=False)] for p, ev in publications.items()
    }

    # --- Timer fires at correct interval
    all_gaps = [g for gs in gaps.values() for g in gs]
    late, lapsed = late_and_lapsed(rows, cfg.tolerance)
    ok = (
        all(gaps[p] for p in ctx.providers)
        and all(abs(g - interval) <= cfg.tolerance * interval for g in all_gaps)
        and not late
    )
    lateness = {
        p: rows[p]["lateness_max"]
        for p in ctx.providers
        if rows.get(p) and rows[p]["lateness_max"] is not None
    }
    evidence = "; ".join(
        f"{p}: {len(gaps[p])} fire(s), intervals {', '.join(f'{g:.2f}' for g in gaps[p]) or 'none'} s"
        + (f", lateness max {lateness[p] * 1000:.0f} ms" if p in lateness else "")
        for p in ctx.providers
    )
    checks = [
        Check(
            GROUP,
            "Timer fires at correct interval",
            ok,
            round(sum(all_gaps) / len(all_gaps), 3) if all_gaps else None,
            "s mean interval",
            f"{evidence} (expected {interval:.3g}s = 0.8 x ttl {cfg.ttl:g}s)" + _anomalies(late, {}),
        )
    ]

    # --- Service re-published to DHT
    readv = {p: [e for e in publications[p] if e["kind"] == "readvertised"] for p in ctx.providers}
    ok = all(readv[p] and all(e["detail"].get("replicas", 0) >= 1 for e in readv[p]) for p in ctx.providers)
    checks.append(
        Check(
            GROUP,
            "Service re-published to DHT",
            ok,
            sum(len(v) for v in readv.values()),
            "re-publication(s)",
            "; ".join(
                f"{p}: " + (", ".join(f"replicas={e['detail'].get('replicas')}" for e in readv[p]) or "none")
                for p in ctx.providers
            ),
        )
    )

    # --- Next timer scheduled
    ok = all(
        rows.get(p)
        and rows[p]["count"] >= 1
        and 0 < rows[p]["next_fire_in"] <= interval
        and rows[p]["last_fire_ago"] is not None
        and abs(rows[p]["last_fire_ago"] + rows[p]["next_fire_in"] - interval) <= cfg.tolerance * interval
        for p in ctx.providers
    )
    checks.append(
        Check(
            GROUP,
            "Next timer scheduled",
            ok,
            min((rows[p]["next_fire_in"] for p in ctx.providers if rows.get(p)), default=None),
            "s to next fire",
            "; ".join(
                f"{p}: after fire {rows[p]['count']}, next in {rows[p]['next_fire_in']:.2f}s"
                if rows.get(p)
                else f"{p}: no timer"
                for p in ctx.providers
            ),
        )
    )

    # --- Continues indefinitely until unadvertise
    ok = all(counts[p] >= cfg.readvertise_cycles and rows.get(p) for p in ctx.providers)
    checks.append(
        Check(
            GROUP,
            "Continues indefinitely until unadvertise",
            ok,
            min(counts.values(), default=0),
            "fires (min over providers)",
            ", ".join(f"{p}: {counts[p]}/{cfg.readvertise_cycles} fires" for p in ctx.providers)
            + " (the stop on unadvertise is checked under Cleanup)",
        )
    )

    # --- Service Advertisement: re-advertisement happens before TTL expiry
    margins = [cfg.ttl - g for g in all_gaps] + [
        cfg.ttl - rows[p]["interval"] - rows[p]["lateness_max"]
        for p in ctx.providers
        if rows.get(p) and rows[p]["lateness_max"] is not None
    ]
    elapsed = time.time() - first
    live = await ctx.provider_names(refresh=True)
    missing = sorted(set(ctx.providers) - set(live))
    never = [p for p in ctx.providers if not gaps[p]]
    ok = not missing and not never and not lapsed and all(m > 0 for m in margins) and elapsed > cfg.ttl
    checks.append(
        Check(
            ADVERTISEMENT,
            "Re-advertisement happens before TTL expiry",
            ok,
            round(min(margins), 3) if margins else None,
            "s margin before expiry (min)",
            f"{elapsed:.1f}s after the first publication (ttl {cfg.ttl:g}s) the DHT returns {live}"
            + (f"; missing {missing}: their records expired" if missing else "")
            + (f"; never re-advertised: {never}" if never else "")
            + _anomalies({}, lapsed),
        )
    )
    return checks
