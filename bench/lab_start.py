"""How long a user waits for a mesh: ``Lab.start(n)`` to ready, then the first advertise and call.

Run ``python bench/lab_start.py --help``.  Each case runs in a fresh Python
process (so its RSS is its own): ``await Lab.start(n)`` on QUIC (n = 10, 30, 60)
or on the simulated network (n = 100, 300, 1000), then one node advertises a
service and the time to that first advertise and the first call is taken;
then 500 lookups of the fresh service from random nodes, right after start
(``discover(refresh=True)``: the DHT, not a cache), count how many found it.
Every case runs ``--runs`` times (5); the report gives medians and the spread
of start times across runs.

Printed per case: start wall time (median, min-max), per-node cost, peak RSS,
first advertise and first call, lookups found / asked, bootstrap timeouts
(joins that had to retry because no bootstrap peer answered in time).

Targets (PASS/MISS): QUIC n=60 ready in <= 3 s with the first advertise <=
100 ms; memory n=1000 ready in <= 20 s; per-node start cost from memory n=100
to n=1000 growing no faster than logarithmically (cost(1000)/cost(100) <=
log2(1000)/log2(100) = 1.5); 100% of lookups right after start; 0 bootstrap
timeouts.  Exit status 0 whatever the verdict, 1 if a case crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: F401  (makes macula_lab importable from a checkout)
from _common import log, median, table, verdict, verdict_lines

CASES = [("quic", 10), ("quic", 30), ("quic", 60), ("memory", 100), ("memory", 300), ("memory", 1000)]
SERVICE = "bench.fresh"


# ------------------------------------------------------------------ one case (child process)
async def one_case(transport: str, n: int, lookups: int, seed: int) -> dict[str, Any]:
    import logging

    from macula_lab import Lab

    timeouts = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "not reachable" in record.getMessage() or "no bootstrap peer reachable" in record.getMessage():
                timeouts.append(record.getMessage())

    logging.getLogger("macula_lab").addHandler(Count())
    logging.getLogger("macula_lab").setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    t0, cpu0 = loop.time(), time.process_time()
    lab = await Lab.start(n, transport=transport, sample_interval=None, seed=seed)
    start, cpu = loop.time() - t0, time.process_time() - cpu0
    handshakes = sum(h.node.transport.stats().get("handshakes", 0) for h in lab.nodes)
    messages = lab.network.stats()["sent"] if lab.network is not None else None
    try:
        rng = random.Random(seed)
        names = lab.names
        provider = lab.node(rng.choice(names))
        t1 = loop.time()
        await provider.advertise(SERVICE, "echo", ttl=300)
        first_advertise = loop.time() - t1
        caller = lab.node(rng.choice([x for x in names if x != provider.name]))
        t2 = loop.time()
        await caller.call(SERVICE, {"ping": 1})
        first_call = loop.time() - t2
        found = 0
        for _ in range(lookups):
            node = lab.node(rng.choice(names))
            found += bool(await node.discover(SERVICE, refresh=True))
        return {
            "transport": transport,
            "n": n,
            "start_s": start,
            "start_cpu_s": cpu,
            "per_node_ms": start / n * 1000,
            "handshakes_per_node": handshakes / n,
            "messages_per_node": None if messages is None else messages / n,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "first_advertise_ms": first_advertise * 1000,
            "first_call_ms": first_call * 1000,
            "found": found,
            "lookups": lookups,
            "bootstrap_timeouts": len(timeouts),
        }
    finally:
        await lab.stop()


def child_main(args: argparse.Namespace) -> None:
    result = asyncio.run(one_case(args.transport, args.n, args.lookups, args.seed))
    print(json.dumps(result))


# ------------------------------------------------------------------ the driver
def run_case(transport: str, n: int, lookups: int, seed: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", transport, str(n), "--lookups", str(lookups), "--seed", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{transport} n={n} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[tuple[str, int], list[dict[str, Any]]]) -> tuple[list[str], list[tuple[str, str, str, str]]]:
    rows = []
    summary: dict[tuple[str, int], dict[str, float]] = {}
    for (transport, n), runs in results.items():
        starts = [r["start_s"] for r in runs]
        s = {
            "start": median(starts),
            "per_node": median(r["per_node_ms"] for r in runs),
            "rss": max(r["rss_mib"] for r in runs),
            "adv": median(r["first_advertise_ms"] for r in runs),
            "cpu": median(r["start_cpu_s"] for r in runs),
            "hs": median(r["handshakes_per_node"] for r in runs),
            "msgs": median(r["messages_per_node"] or math.nan for r in runs),
            "call": median(r["first_call_ms"] for r in runs),
            "found": sum(r["found"] for r in runs),
            "asked": sum(r["lookups"] for r in runs),
            "timeouts": sum(r["bootstrap_timeouts"] for r in runs),
        }
        summary[(transport, n)] = s
        rows.append(
            [
                transport,
                str(n),
                f"{s['start']:.2f} ({min(starts):.2f}-{max(starts):.2f})",
                f"{s['cpu']:.2f}",
                f"{s['per_node']:.1f}",
                f"{s['hs']:.1f}" if transport == "quic" else f"{s['msgs']:.0f} msgs",
                f"{s['rss']:.0f}",
                f"{s['adv']:.0f}",
                f"{s['call']:.1f}",
                f"{s['found']}/{s['asked']}",
                str(s["timeouts"]),
            ]
        )
    lines = table(
        ["transport", "n", "start s median (min-max)", "CPU s", "ms/node", "handshakes or messages /node",
         "peak RSS MiB", "1st advertise ms",
         "1st call ms", "lookups found", "bootstrap timeouts"],
        rows,
    )
    checks: list[tuple[str, str, str, str]] = []
    q60 = summary.get(("quic", 60))
    if q60:
        checks.append(("QUIC n=60 ready", f"{q60['start']:.2f} s", "<= 3 s", verdict(q60["start"], q60["start"] <= 3)))
        checks.append(
            ("QUIC n=60 first advertise", f"{q60['adv']:.0f} ms", "<= 100 ms", verdict(q60["adv"], q60["adv"] <= 100))
        )
    m1000, m100 = summary.get(("memory", 1000)), summary.get(("memory", 100))
    if m1000:
        checks.append(
            ("memory n=1000 ready", f"{m1000['start']:.1f} s", "<= 20 s", verdict(m1000["start"], m1000["start"] <= 20))
        )
    if m1000 and m100:
        growth = m1000["per_node"] / m100["per_node"]
        bound = math.log2(1000) / math.log2(100)
        checks.append(
            ("per-node cost growth, memory 100 -> 1000", f"{growth:.2f}x", f"<= {bound:.2f}x", verdict(growth, growth <= bound))
        )
    found = sum(s["found"] for s in summary.values())
    asked = sum(s["asked"] for s in summary.values())
    checks.append(
        ("lookups right after start", f"{found}/{asked}", "100%", verdict(found if asked else math.nan, found == asked))
    )
    timeouts = sum(s["timeouts"] for s in summary.values())
    checks.append(("bootstrap timeouts", str(timeouts), "0", verdict(timeouts, timeouts == 0)))
    return lines, checks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=2, metavar=("TRANSPORT", "N"), help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    p.add_argument("--lookups", type=int, default=500, help="lookups of the fresh service per run (default 500)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cases", default=",".join(f"{t}:{n}" for t, n in CASES), help="e.g. quic:60,memory:1000")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it counts as hung")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    if args.child:
        args.transport, args.n = args.child[0], int(args.child[1])
        child_main(args)
        return 0
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",") if c]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    crashed = False
    for transport, n in cases:
        for run in range(args.runs):
            log(f"{transport} n={n} run {run + 1}/{args.runs}")
            try:
                r = run_case(transport, n, args.lookups, args.seed + run, args.timeout)
            except Exception as exc:  # noqa: BLE001 - a crashed case is reported, the others still run
                log(f"CRASHED: {exc}")
                crashed = True
                continue
            log(
                f"  start {r['start_s']:.2f} s, first advertise {r['first_advertise_ms']:.0f} ms, "
                f"found {r['found']}/{r['lookups']}, bootstrap timeouts {r['bootstrap_timeouts']}"
            )
            results.setdefault((transport, n), []).append(r)
    lines, checks = report(results)
    print("\n".join(lines))
    print()
    print("\n".join(verdict_lines(checks)))
    if args.json:
        _common.write_json(args.json, {"results": {f"{t}:{n}": r for (t, n), r in results.items()}, "checks": checks})
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
