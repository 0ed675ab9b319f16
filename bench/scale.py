"""The mesh at scale, in virtual time: one row per size, then PASS/MISS per target of issue 16.

Run ``python bench/scale.py --help``.  Not run in CI (minutes at 10,000 nodes).

Each size runs in a fresh Python process (its RSS is its own):
``Simulation.start(n, seed, latency=20 ms, jitter=5 ms, loss=1%)``, then every
node advertises one service (``svc.<node>``, TTL 300 s), then ``n`` lookups
(``discover(refresh=True)``: the DHT, not a cache) of random services from
random nodes.  Printed per size: join, advertise and lookup wall seconds, CPU
seconds, requests per join/advertisement/lookup, lookup success, mean hops
against ``1.5 * log2(n / k) + 2``, peak RSS, simulated seconds per wall second.

``--churn``: 1,000 nodes for an hour of simulated time, 5% of the running
nodes crashed and replaced every simulated minute, each newcomer advertising
its own service (TTL 300 s); at the end every live node's service is looked
up (target: all found) and so is every service whose provider died more than
TTL + one re-advertise interval (540 s) before (target: no dead provider
returned).  ``--reruns R``: the size ``--rerun-n`` run R times in one process
with the same seed (target: equal trace hashes) and once with another seed
(target: a different one).

Exit status 0 whatever the verdict, 1 if a case crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: F401  (makes macula_lab importable from a checkout)
from _common import log

from macula_lab import Simulation

K = 20
TTL = 300
READVERTISE = 0.8 * TTL
LIMIT_WALL = 600.0  # 10 minutes for the 10,000-node case
LIMIT_RSS_MB = 4096.0


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hop_bound(n: int) -> float:
    return 1.5 * math.log2(max(n / K, 1)) + 2


async def size_case(n: int, seed: int, loss: float) -> dict[str, Any]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sim = await Simulation.start(n, seed=seed, latency=0.02, jitter=0.005, loss=loss, progress=False)
    join_wall, join_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    join_msgs = sim.network.sent
    log(f"n={n}: joined in {join_wall:.1f} s wall, {sim.now:.1f} simulated s")
    names = sim.names
    t = time.perf_counter()
    await sim.advertise_many([(name, f"svc.{name}") for name in names], ttl=TTL)
    adv_wall, adv_msgs = time.perf_counter() - t, sim.network.sent - join_msgs
    log(f"n={n}: {n} advertisements in {adv_wall:.1f} s wall")
    askers = sim.random_nodes(n)
    targets = sim.random_nodes(n)
    t = time.perf_counter()
    sent0 = sim.network.sent
    await sim.discover_many([(a, f"svc.{b}") for a, b in zip(askers, targets, strict=True)])
    look_wall, look_msgs = time.perf_counter() - t, sim.network.sent - sent0
    ops = sim.operations()
    looks = ops[ops.op == "discover"]
    advs = ops[ops.op == "advertise"]
    wall = time.perf_counter() - wall0
    row = {
        "n": n,
        "join_s": join_wall,
        "advertise_s": adv_wall,
        "lookup_s": look_wall,
        "total_s": wall,
        "cpu_s": time.process_time() - cpu0,
        "join_cpu_ms_per_node": join_cpu / n * 1000,
        "msgs_per_join": join_msgs / n,
        "msgs_per_advertise": adv_msgs / n,
        "msgs_per_lookup": look_msgs / n,
        "advertised_ok": float((advs.outcome == "ok").mean()),
        "lookup_success": float((looks.outcome == "ok").mean()),
        "mean_hops": float(looks.hops.mean()),
        "hop_bound": hop_bound(n),
        "lookup_latency_ms": float(looks.latency.mean() * 1000),
        "rss_mb": rss_mb(),
        "sim_s": sim.now,
        "sim_per_wall": sim.now / wall,
        "trace": sim.trace_hash(),
    }
    await sim.stop()
    return row


async def churn_case(n: int, seed: int, minutes: int) -> dict[str, Any]:
    wall0 = time.perf_counter()
    sim = await Simulation.start(n, seed=seed, latency=0.02, jitter=0.005, loss=0.0, progress=False)
    await sim.advertise_many([(name, f"svc.{name}") for name in sim.names], ttl=TTL)
    log(f"churn: {n} nodes joined and advertised in {time.perf_counter() - wall0:.1f} s")
    history = await sim.churn(0.05, 60, minutes * 60, service="svc.{node}", ttl=TTL)
    churn_wall = time.perf_counter() - wall0
    end = sim.now
    live = sim.running()
    dead_long = [name for at, name in history["killed"] if end - at > TTL + READVERTISE]
    before = len(sim.operations())
    await sim.discover_many(
        [(a, f"svc.{b}") for a, b in zip(sim.random_nodes(len(live)), live, strict=True)]
        + [(a, f"svc.{b}") for a, b in zip(sim.random_nodes(len(dead_long)), dead_long, strict=True)]
    )
    ops = sim.operations().iloc[before:]
    live_ops, dead_ops = ops.iloc[: len(live)], ops.iloc[len(live) :]
    row = {
        "n": n,
        "minutes": minutes,
        "killed": len(history["killed"]),
        "added": len(history["added"]),
        "live_found": float((live_ops.outcome == "ok").mean()),
        "dead_checked": len(dead_ops),
        "dead_returned": int(ops.dead_providers.fillna(0).sum()),
        "stale_services_found": int((dead_ops.providers.fillna(0) > 0).sum()),
        "wall_s": churn_wall,
        "sim_per_wall": sim.now / (time.perf_counter() - wall0),
        "rss_mb": rss_mb(),
    }
    await sim.stop()
    return row


async def rerun_case(n: int, seed: int, runs: int) -> dict[str, Any]:
    async def once(s: int) -> str:
        sim = await Simulation.start(n, seed=s, latency=0.02, jitter=0.005, loss=0.01, progress=False)
        await sim.advertise_many([(name, f"svc.{name}") for name in sim.names[: n // 10]], ttl=60)
        await sim.run_for(120)
        h = sim.trace_hash()
        await sim.stop()
        return h

    t = time.perf_counter()
    hashes = []
    for i in range(runs):
        hashes.append(await once(seed))
        log(f"rerun {i + 1}/{runs}: {hashes[-1]}")
    other = await once(seed + 1)
    return {"n": n, "runs": runs, "distinct": len(set(hashes)), "other_differs": other not in hashes, "wall_s": time.perf_counter() - t}


def child(args: argparse.Namespace) -> None:
    if args.case == "size":
        row = asyncio.run(size_case(args.n, args.seed, args.loss))
    elif args.case == "churn":
        row = asyncio.run(churn_case(args.n, args.seed, args.minutes))
    else:
        row = asyncio.run(rerun_case(args.n, args.seed, args.runs))
    print(json.dumps(row))


def spawn(argv: list[str], timeout: float) -> dict[str, Any] | str:
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", *argv], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"no result within {timeout:g} s"
    sys.stderr.write(out.stderr[-4000:])
    if out.returncode:
        return f"exit {out.returncode}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[100, 1000, 10000])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--loss", type=float, default=0.01)
    p.add_argument("--churn", action="store_true", help="an hour of churn at --churn-n nodes")
    p.add_argument("--churn-n", type=int, default=1000)
    p.add_argument("--minutes", type=int, default=60)
    p.add_argument("--reruns", type=int, default=0, help="determinism: this many reruns at --rerun-n")
    p.add_argument("--rerun-n", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", default="size", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    crashed = False
    verdicts: list[str] = []

    def verdict(ok: bool, what: str) -> None:
        verdicts.append(f"{'PASS' if ok else 'MISS'} {what}")

    cols = (
        "n join_s advertise_s lookup_s total_s cpu_s join_cpu_ms_per_node msgs_per_join msgs_per_advertise "
        "msgs_per_lookup lookup_success mean_hops hop_bound lookup_latency_ms rss_mb sim_per_wall"
    ).split()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    rows = {}
    for n in args.sizes:
        log(f"size {n} ...")
        row = spawn(["--case", "size", "--n", str(n), "--seed", str(args.seed), "--loss", str(args.loss)], args.timeout)
        if isinstance(row, str):
            crashed = True
            print(f"| {n} | CRASHED: {row} |", flush=True)
            verdict(False, f"n={n}: {row}")
            continue
        rows[n] = row
        print("| " + " | ".join(_fmt(row[c]) for c in cols) + " |", flush=True)
        verdict(row["lookup_success"] >= 0.99, f"n={n}: lookup success {row['lookup_success']:.2%} >= 99% (1% loss)")
        verdict(
            row["mean_hops"] <= row["hop_bound"],
            f"n={n}: mean hops {row['mean_hops']:.2f} <= 1.5*log2(n/k)+2 = {row['hop_bound']:.2f}",
        )
        if n >= 10000:
            verdict(row["total_s"] <= LIMIT_WALL, f"n={n}: join+advertise+lookup {row['total_s']:.0f} s <= {LIMIT_WALL:.0f} s wall")
            verdict(row["rss_mb"] <= LIMIT_RSS_MB, f"n={n}: peak RSS {row['rss_mb']:.0f} MiB <= {LIMIT_RSS_MB:.0f} MiB")
    if len(rows) >= 2:
        sizes = sorted(rows)
        a, b = rows[sizes[0]], rows[sizes[-1]]
        print(
            f"\nwall-time growth {sizes[0]} -> {sizes[-1]} nodes: x{b['total_s'] / a['total_s']:.1f} total, "
            f"x{b['join_cpu_ms_per_node'] / a['join_cpu_ms_per_node']:.2f} join CPU per node"
        )
    if args.churn:
        log("churn ...")
        row = spawn(["--case", "churn", "--n", str(args.churn_n), "--seed", str(args.seed), "--minutes", str(args.minutes)], args.timeout)
        if isinstance(row, str):
            crashed = True
            verdict(False, f"churn: {row}")
        else:
            print("\nchurn: " + json.dumps({k: _fmt(v) for k, v in row.items()}))
            verdict(row["live_found"] == 1.0, f"churn: {row['live_found']:.2%} of live services discoverable at the end")
            verdict(row["dead_returned"] == 0, f"churn: {row['dead_returned']} dead providers returned after TTL + one re-advertise interval")
            verdict(row["wall_s"] <= 120, f"churn: {row['minutes']} simulated minutes in {row['wall_s']:.0f} s wall <= 120 s")
    if args.reruns:
        log("reruns ...")
        row = spawn(["--case", "reruns", "--n", str(args.rerun_n), "--seed", str(args.seed), "--runs", str(args.reruns)], args.timeout)
        if isinstance(row, str):
            crashed = True
            verdict(False, f"reruns: {row}")
        else:
            print("\nreruns: " + json.dumps({k: _fmt(v) for k, v in row.items()}))
            verdict(row["distinct"] == 1, f"determinism: {row['runs']} reruns at n={row['n']} gave {row['distinct']} distinct trace hash(es)")
            verdict(row["other_differs"], "determinism: another seed gives another hash")
    print()
    for line in verdicts:
        print(line)
    return 1 if crashed else 0


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
