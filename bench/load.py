"""Open-loop load (``macula-lab load``'s engine) against a 3-node lab, next to closed-loop figures.

Run ``python bench/load.py --help``.  The multi-node testing guide's mesh:
node-1 and node-3 provide ``math.add`` (the calculator handler), node-2 calls
it (random selection between the two, discovery cache hits).  Two targets:

``in-process``
    the three nodes and the generator in this process, on one event loop,
    QUIC on loopback (``Lab.start(3)``): what ``macula-lab load`` does by default
    and what a notebook sees;
``netns`` (root only, ``--netns``)
    three ``macula-lab node`` processes in network namespaces with
    docker/compose.yaml's environment; the generator attaches to node-2, which
    calls for it (one more hop: the attached client's session).

For each: a saturation search (open loop, a doubling ramp from
``--start-rate``, then ``--refine`` bisecting steps; the saturation point is
the first rate whose p99, measured from the intended send time, passes
``--p99-bound`` ms or whose error rate passes ``--max-errors``), then closed
loops (``--closed`` workers, each waiting for its reply) on the same nodes:
1 worker is ``bench/services.py``'s sequential latency, 64 its throughput test.

Exit status: 0 (a benchmark, not a test); 1 if a run crashed.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # also makes macula_lab importable from a checkout that is not pip-installed
from _common import log

from macula_lab.lab.lab import Lab
from macula_lab.lab.load import LoadConfig, TextProgress, find_saturation, run_closed_loop

SERVICE = "math.add"


async def in_process() -> tuple[Lab, Any]:
    lab = await Lab.start(3, sample_interval=None)
    for provider in ("node-1", "node-3"):
        await lab.node(provider).advertise(SERVICE, "calculator", ttl=300)
    return lab, None


async def netns() -> tuple[Lab, Any]:
    from macula_lab.deploy.netns import NetnsMesh

    mesh = await NetnsMesh(source="compose", subnet=os.environ.get("MACULA_NETNS_SUBNET")).start()
    try:
        lab = await Lab.attach([mesh.endpoint("node-2")], realm=mesh.realm, ca=mesh.ca, sample_interval=None)
    except BaseException:
        await mesh.close()
        raise
    return lab, mesh


async def measure(name: str, start, args: argparse.Namespace) -> dict[str, Any]:
    lab, mesh = await start()
    try:
        for _ in range(50):  # warm the caller's cache and connections to both providers
            await lab.node("node-2").call(SERVICE, {"a": 1, "b": 2}, timeout=args.timeout)
        config = LoadConfig(
            duration=args.duration,
            warmup=args.warmup,
            services=SERVICE,
            callers=["node-2"],
            timeout=args.timeout,
        )
        log(f"[{name}] saturation search")
        sat = await find_saturation(
            lab,
            config,
            start_rate=args.start_rate,
            max_rate=args.max_rate,
            p99_bound_ms=args.p99_bound,
            max_error_rate=args.max_errors,
            min_throughput=args.min_throughput,
            refine=args.refine,
            confirm=args.confirm,
            progress=None if args.quiet else TextProgress(sys.stderr),
            on_step=lambda r: log(f"[{name}] {r.config.rate:g}/s: {r.summary()}"),
        )
        closed = {}
        for workers in args.closed:
            log(f"[{name}] closed loop, {workers} workers")
            closed[workers] = await run_closed_loop(lab, config, concurrency=workers)
        return {"saturation": sat, "closed": closed}
    finally:
        await lab.stop()
        if mesh is not None:
            await mesh.close()


def report(name: str, res: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", "", *res["saturation"].text().splitlines(), ""]
    rows = []
    for workers, r in res["closed"].items():
        s = r.summary()
        rows.append(
            [
                str(workers),
                f"{r.achieved_rate:.1f}",
                f"{s['p50_ms']:.3f}",
                f"{s['p99_ms']:.3f}",
                str(s["errors"]),
            ]
        )
    lines += _common.table(["closed loop workers", "ok/s", "p50 ms", "p99 ms", "errors"], rows)
    return [*lines, ""]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _common.parser(__doc__)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per step (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds per step before measuring (default 1)")
    p.add_argument("--start-rate", type=float, default=100.0)
    p.add_argument("--max-rate", type=float, default=6400.0)
    p.add_argument("--refine", type=int, default=2)
    p.add_argument("--confirm", type=int, default=1, help="re-runs of a step past a bound (default 1)")
    p.add_argument("--p99-bound", type=float, default=50.0, help="ms (default 50)")
    p.add_argument("--max-errors", type=float, default=0.01)
    p.add_argument("--min-throughput", type=float, default=0.9)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--closed", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    p.add_argument("--netns", action="store_true", help="also against node processes in network namespaces")
    p.add_argument("--quiet", action="store_true")
    _common.add_json_option(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = _common.environment("aioquic", "msgpack", "hdrhistogram")
    targets = [("in-process 3-node lab", in_process)]
    if args.netns:
        targets.append(("3 node processes in network namespaces (attached to node-2)", netns))
    results, crashed = {}, False
    for name, start in targets:
        try:
            results[name] = _common.run_timed(measure(name, start, args))
        except Exception:
            log(f"[{name}] CRASHED\n{traceback.format_exc()}")
            crashed = True
    print(_common.environment_line(env, ["aioquic", "msgpack", "hdrhistogram"]))
    print(
        f"workload: {SERVICE} from node-2, providers node-1 and node-3 (random), "
        f"{args.duration:g} s per step after {args.warmup:g} s warm-up, per-attempt timeout {args.timeout:g} s"
    )
    print()
    for name, res in results.items():
        print("\n".join(report(name, res)))
    if args.json:
        _common.write_json(
            args.json,
            {
                "environment": env,
                "args": vars(args),
                "results": {
                    name: {
                        "saturation": res["saturation"].to_dict(),
                        "closed": {w: r.to_dict() for w, r in res["closed"].items()},
                    }
                    for name, res in results.items()
                },
            },
        )
        log(f"wrote {args.json}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
