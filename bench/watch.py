"""Watch latency: how long from a change of a service's providers to the event at every watcher.

Run ``python bench/watch.py --help``.  Per transport (a 30-node QUIC lab on
loopback with mutual TLS, and 30 nodes on the simulated network), the ``--watchers``
nodes farthest from the service's key (no replicas: what they see crossed the
network) watch one service; then ``--changes`` times a
provider node advertises it (or, if it already does, unadvertises it), one
change at a time.  The clock starts when the advertise / unadvertise call is
made (the publication's own time counts) and stops when a watcher yields the
matching event; each change waits for every watcher (or ``--deadline``).

Printed per transport: samples, p50, p90, p99 and max latency, changes missed
(no event by the deadline), duplicates, and how many changes a reconciliation
read caught before any push (``missed_by_push``).

``--no-push``: the replicas push nothing (every push lost), so each change
is caught by a reconciliation read: the bound the reads alone keep.

Targets (PASS/MISS): p99 <= the reconciliation interval (``watch_interval``,
5 s: the bound a missed push is caught within), p50 <= 250 ms (the event is
pushed, not polled; not judged with ``--no-push``), 0 missed and 0 duplicates.  Exit status 0 whatever the
verdict, 1 if a case crashed.  Not run in CI (tests/bench smoke-runs it tiny).
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: F401  (makes macula_lab importable from a checkout)
from _common import crashed, log, percentile, table, verdict, verdict_lines, write_json

SERVICE = "bench.watched"
RECONCILE = 5.0  # the nodes' watch_interval (the default)
P50_TARGET = 0.25


async def one_case(
    transport: str, n: int, watchers: int, changes: int, deadline: float, seed: int, push: bool = True
) -> dict[str, Any]:
    from macula_lab import Lab
    from macula_lab.core.ids import service_key, xor_distance

    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    lab = await Lab.start(n, transport=transport, sample_interval=None, seed=seed, watch_interval=RECONCILE)
    try:
        names = lab.names
        for name in names:
            lab.node(name).node.watches.pushing = push
        # the farthest from the key: with n > k they are no replicas, so what they see crossed the network
        key = service_key(lab.realm, SERVICE)
        watching = sorted(names, key=lambda x: xor_distance(lab.node(x).node.node_id, key))[-watchers:]
        providers = [x for x in names if x not in watching]
        arrived: dict[str, list[tuple[float, str, str]]] = {w: [] for w in watching}
        news = asyncio.Event()

        async def follow(name: str, watch) -> None:
            async for event in watch:
                if event.kind != "reset":
                    arrived[name].append((loop.time(), event.kind, event.provider.name))
                    news.set()

        watches = {w: lab.node(w).watch(SERVICE) for w in watching}
        for w in watches.values():
            assert (await w.next(timeout=30)).kind == "reset"
        tasks = [asyncio.create_task(follow(name, w)) for name, w in watches.items()]
        advertising: set[str] = set()
        samples: list[float] = []
        missed = duplicates = 0
        missed_detail: list[str] = []
        for i in range(changes):
            who = rng.choice(providers)
            kind = "removed" if who in advertising else "added"
            t0 = loop.time()
            if kind == "added":
                await lab.node(who).advertise(SERVICE, "echo", ttl=300, metadata={"name": who})
                advertising.add(who)
            else:
                await lab.node(who).unadvertise(SERVICE)
                advertising.discard(who)

            end = t0 + deadline
            while not all(seen(arrived[w], kind, who, t0) for w in watching):
                news.clear()
                try:
                    async with asyncio.timeout(max(0.0, end - loop.time())):
                        await news.wait()
                except TimeoutError:
                    break
            for w in watching:
                got = seen(arrived[w], kind, who, t0)
                if got:
                    samples.append(got[0] - t0)
                else:
                    missed += 1
                    missed_detail.append(f"change {i}: {kind} {who} not seen by {w}")
                    log(f"  {transport}: MISSED {missed_detail[-1]}")
            for w in watching:  # what was consumed for this change: each watcher saw it at most once
                duplicates += max(0, len(seen(arrived[w], kind, who, t0)) - 1)
                arrived[w] = [x for x in arrived[w] if x[0] < t0 or not (x[1] == kind and x[2] == who)]
            if (i + 1) % 10 == 0:
                log(f"  {transport}: {i + 1}/{changes} changes")
        for w in watches.values():
            w.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        by_push = sum(lab.node(w).node.watches.counters["missed_by_push"] for w in watching)
        samples.sort()
        return {
            "transport": transport,
            "nodes": n,
            "watchers": watchers,
            "changes": changes,
            "samples": len(samples),
            "p50": percentile(samples, 50),
            "p90": percentile(samples, 90),
            "p99": percentile(samples, 99),
            "max": samples[-1] if samples else float("nan"),
            "missed": missed,
            "duplicates": duplicates,
            "caught_by_reads": by_push,
            "missed_detail": missed_detail,
        }
    finally:
        await lab.stop()


def seen(arrivals: list[tuple[float, str, str]], kind: str, who: str, t0: float) -> list[float]:
    """When a watcher yielded ``kind`` for provider ``who`` since ``t0``."""
    return [t for t, k, p in arrivals if k == kind and p == who and t >= t0]


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--transports", default="quic,memory", help="quic, memory or both (default)")
    p.add_argument("--nodes", type=int, default=30)
    p.add_argument("--watchers", type=int, default=5)
    p.add_argument("--changes", type=int, default=40)
    p.add_argument("--deadline", type=float, default=2 * RECONCILE + 5, help="seconds a change may take to arrive")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-push", action="store_true", help="replicas push nothing: measure the reads alone")
    _common.add_json_option(p)
    args = p.parse_args()
    transports = _common.system_list(p, args.transports, ["quic", "memory"], allow_empty=False)
    _common.require_positive(p, args, "nodes", "watchers", "changes")
    if args.watchers >= args.nodes:
        p.error("--watchers must leave at least one node to provide")
    results, failed = [], False
    for transport in transports:
        log(f"{transport}: {args.nodes} nodes, {args.watchers} watchers, {args.changes} changes")
        try:
            results.append(
                asyncio.run(
                    asyncio.wait_for(
                        one_case(
                            transport, args.nodes, args.watchers, args.changes, args.deadline, args.seed,
                            push=not args.no_push,
                        ),
                        timeout=args.changes * (args.deadline + 10) + 120,
                    )
                )
            )
        except Exception as exc:
            failed = True
            results.append({"transport": transport, "error": crashed(exc, 0, transport)})
    env = _common.environment("aioquic")
    print(_common.environment_line(env, ["aioquic"]))
    how = "pushes off, reads alone" if args.no_push else "pushed"
    print(f"watch latency, change to event ({how}): {args.nodes} nodes, {args.watchers} watchers, {args.changes} changes\n")
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    rows = [
        [r["transport"], str(r["samples"]), ms(r["p50"]), ms(r["p90"]), ms(r["p99"]), ms(r["max"]),
         str(r["missed"]), str(r["duplicates"]), str(r["caught_by_reads"])]
        for r in results if "error" not in r
    ]  # fmt: skip
    head = ["transport", "samples", "p50", "p90", "p99", "max", "missed", "dups", "caught by reads"]
    for line in table(head, rows):
        print(line)
    print()
    checks = []
    for r in results:
        if "error" in r:
            print(f"{r['transport']}: CRASHED {r['error']}")
            continue
        t = r["transport"]
        checks += [
            (f"{t} p99", ms(r["p99"]), f"<= {RECONCILE:g} s (reconciliation)", verdict(r["p99"], r["p99"] <= RECONCILE)),
            (f"{t} p50", ms(r["p50"]), f"<= {P50_TARGET * 1000:g} ms (pushed)",
             verdict(r["p50"], r["p50"] <= P50_TARGET, judged=not args.no_push)),
            (f"{t} missed + dups", str(r["missed"] + r["duplicates"]), "0", verdict(0, r["missed"] + r["duplicates"] == 0)),
        ]
    for line in verdict_lines(checks):
        print(line)
    if args.json:
        write_json(args.json, {"environment": env, "args": vars(args), "results": results})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
