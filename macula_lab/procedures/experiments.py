"""The testing guide's "Next Steps" as experiments: provider selection strategies, and failover.

- :func:`compare_strategies`: the same calls under each strategy; which
  provider served each, and how fast.  Checks what each strategy promises.
- :func:`failover_under_kill`: calls spread over the providers while one is
  killed (no goodbye): the failed provider is retried elsewhere, removed from
  the cache, the DHT is asked again when every cached provider failed, and the
  dead provider's records lapse after one TTL.

Both need a lab in this process (``kill_node``); they return rows (one per call)
for plotting and a :class:`Report`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from .report import Check, Report

if TYPE_CHECKING:
    from ..lab.lab import Lab

SELECTION = "Provider Selection"
FAILOVER = "Failover"
STRATEGIES = ("random", "round_robin", "first", "local_first", "least_loaded")


async def compare_strategies(
    lab: Lab,
    service: str,
    consumer: str,
    providers: list[str],
    *,
    strategies: tuple[str, ...] | list[str] = STRATEGIES,
    calls: int = 30,
    concurrency: int = 3,
    args: Any = None,
    timeout: float = 2.0,
) -> tuple[list[dict[str, Any]], Report]:
    """``calls`` calls per strategy, ``concurrency`` at a time; rows and checks."""
    args = args if args is not None else {"operation": "add", "a": 1, "b": 2}
    rows: list[dict[str, Any]] = []
    report = Report("selection", parameters={"strategies": list(strategies), "calls": calls})
    node = lab.node(consumer)
    for strategy in strategies:
        done = 0
        while done < calls:
            batch = min(concurrency, calls - done)
            results = await asyncio.gather(
                *(node.call(service, args, strategy=strategy, timeout=timeout) for _ in range(batch)),
                return_exceptions=True,
            )
            for r in results:
                row = {
                    "strategy": strategy,
                    "call": done,
                    "provider": None,
                    "latency_ms": None,
                    "error": None,
                }
                if isinstance(r, BaseException):
                    row["error"] = f"{type(r).__name__}: {r}"
                else:
                    row.update(provider=r.provider, latency_ms=r.latency * 1000)
                rows.append(row)
                done += 1
        report.add(
            _selection_check(strategy, [r for r in rows if r["strategy"] == strategy], consumer, providers)
        )
    return rows, report.finish()


def _selection_check(strategy: str, rows: list[dict[str, Any]], consumer: str, providers: list[str]) -> Check:
    served = [r["provider"] for r in rows if r["provider"]]
    errors = [r["error"] for r in rows if r["error"]]
    counts = Counter(served)
    spread = dict(sorted(counts.items()))
    if strategy == "round_robin":
        ok = set(counts) == set(providers) and max(counts.values()) - min(counts.values()) <= 1
        what = "every provider in turn, evenly"
    elif strategy == "first":
        ok = len(counts) == 1
        what = "always the same provider (the lowest node id)"
    elif strategy == "local_first":
        ok = set(counts) == {consumer} if consumer in providers else len(counts) >= 1
        what = (
            "the consumer itself" if consumer in providers else "any provider (the consumer provides nothing)"
        )
    elif strategy == "random":
        ok = len(counts) >= min(2, len(providers))
        what = "several providers"
    else:
        ok = len(counts) >= 1
        what = "the least busy provider"
    ok = ok and not errors and len(served) == len(rows)
    return Check(
        SELECTION,
        f"{strategy}: {what}",
        ok,
        len(counts),
        "provider(s) used",
        f"{len(served)}/{len(rows)} calls served: {spread}" + (f"; errors: {errors[:3]}" if errors else ""),
    )


async def failover_under_kill(
    lab: Lab,
    service: str,
    consumer: str,
    victim: str,
    survivors: list[str],
    *,
    ttl: float,
    calls: int = 20,
    kill_after: int = 6,
    timeout: float = 0.5,
    args: Any = None,
) -> tuple[list[dict[str, Any]], Report]:
    """Round-robin calls; ``victim`` is killed after ``kill_after`` of them (see the module docstring)."""
    args = args if args is not None else {"operation": "add", "a": 1, "b": 2}
    node = lab.node(consumer)
    report = Report("failover", parameters={"victim": victim, "calls": calls, "kill_after": kill_after})
    requery = f"{service}.requery"
    # the re-query scenario: the consumer caches the victim as requery's only provider,
    # a survivor starts providing it afterwards, then the victim dies
    await lab.node(victim).advertise(requery, "calculator", ttl=ttl)
    cached = await node.discover(requery, refresh=True)
    await lab.node(survivors[0]).advertise(requery, "calculator", ttl=ttl)
    await node.discover(service, refresh=True)  # the cache knows every provider, the victim included
    rows: list[dict[str, Any]] = []
    killed_at = None
    for i in range(calls):
        if i == kill_after:
            await lab.kill_node(victim)
            killed_at = time.time()
        t0 = time.time()
        row: dict[str, Any] = {"call": i, "t": t0, "after_kill": killed_at is not None}
        try:
            res = await node.call(service, args, strategy="round_robin", timeout=timeout)
            row.update(
                provider=res.provider,
                latency_ms=res.latency * 1000,
                attempts=len(res.attempts),
                failed=[a.provider for a in res.attempts if a.error],
                error=None,
            )
        except Exception as exc:
            row.update(
                provider=None, latency_ms=(time.time() - t0) * 1000, attempts=0, failed=[], error=str(exc)
            )
        rows.append(row)
    after = [r for r in rows if r["after_kill"]]
    ok = bool(after) and all(r["error"] is None for r in after)
    report.add(
        Check(
            FAILOVER,
            "Every call succeeds after a provider is killed",
            ok,
            sum(r["error"] is None for r in after),
            f"of {len(after)} calls",
            "; ".join(r["error"] for r in after if r["error"])[:300]
            or f"served by {sorted({r['provider'] for r in after})}",
        )
    )
    retried = [r for r in after if victim in r["failed"]]
    report.add(
        Check(
            FAILOVER,
            "Retry failed providers (on the next provider)",
            bool(retried) and all(r["provider"] in survivors for r in retried),
            len(retried),
            "call(s) failed over",
            f"calls {[r['call'] for r in retried]}: {victim} timed out, served by "
            f"{[r['provider'] for r in retried]} in {[round(r['latency_ms']) for r in retried]} ms",
        )
    )
    first = retried[0]["call"] if retried else None
    later = [r for r in after if first is not None and r["call"] > first]
    again = [r["call"] for r in later if victim in r["failed"]]
    report.add(
        Check(
            FAILOVER,
            "Remove failed providers from cache",
            first is not None and not again,
            len(again),
            "later attempt(s) on the dead provider",
            f"{len(later)} calls after the first failover never tried {victim}"
            if not again
            else f"calls {again} tried {victim} again",
        )
    )
    try:
        res = await node.call(requery, args, timeout=timeout)
        tried = [a.provider for a in res.attempts]
        ok = [p for p in tried if p == victim] and res.provider == survivors[0]
        evidence = (
            f"cached {[e.metadata.get('node') for e in cached]}; attempts {tried}: "
            f"{victim} failed, the DHT was asked again and {res.provider} answered"
        )
    except Exception as exc:
        ok, evidence = False, f"{type(exc).__name__}: {exc}"
    report.add(Check(FAILOVER, "Re-query DHT on all failures", bool(ok), None, "", evidence))
    # the dead provider cannot unadvertise: its records lapse one TTL after its last publication
    wait = max(0.0, killed_at + ttl - time.time()) + 0.2 if killed_at else 0.0
    await asyncio.sleep(wait)
    names = sorted(str(e.metadata.get("node")) for e in await node.discover(service, refresh=True))
    report.add(
        Check(
            FAILOVER,
            "Dead provider's records lapse after the TTL",
            victim not in names and bool(names),
            len(names),
            "provider(s) left",
            f"{wait:.1f}s later the DHT returns {names}",
        )
    )
    await lab.node(survivors[0]).unadvertise(requery)
    return rows, report.finish()


def plot_selection(rows: list[dict[str, Any]]):
    """Calls per provider under each strategy (bars), and their latency (box per strategy)."""
    import pandas as pd
    import plotly.express as px
    from plotly.subplots import make_subplots

    frame = pd.DataFrame(rows)
    ok = frame[frame["provider"].notna()]
    counts = ok.groupby(["strategy", "provider"], as_index=False).size()
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Calls per provider", "Latency (ms)"))
    for trace in px.bar(counts, x="strategy", y="size", color="provider", barmode="group").data:
        fig.add_trace(trace, row=1, col=1)
    for trace in px.box(ok, x="strategy", y="latency_ms", points="all").data:
        trace.showlegend = False
        fig.add_trace(trace, row=1, col=2)
    fig.update_layout(barmode="group", height=420, title="Provider selection strategies")
    return fig


def plot_failover(rows: list[dict[str, Any]], victim: str):
    """Each call's latency by provider; failed-over calls marked; the kill as a vertical line."""
    import pandas as pd
    import plotly.express as px

    frame = pd.DataFrame(rows)
    frame["failed over"] = frame["failed"].apply(lambda f: victim in f)
    frame["provider"] = frame["provider"].fillna("error")
    fig = px.scatter(
        frame,
        x="call",
        y="latency_ms",
        color="provider",
        symbol="failed over",
        size_max=10,
        title=f"Failover: round-robin calls while {victim} is killed",
        labels={"latency_ms": "call latency (ms)", "call": "call #"},
    )
    killed = frame[frame["after_kill"]]
    if len(killed):
        fig.add_vline(x=int(killed["call"].min()) - 0.5, line_dash="dash", annotation_text=f"{victim} killed")
    fig.update_traces(marker={"size": 10})
    fig.update_layout(height=400)
    return fig
