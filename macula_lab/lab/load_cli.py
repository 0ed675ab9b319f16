"""``macula-lab load``: open-loop load (one rate, or a saturation search) against a lab.

    macula-lab load --rate 500 --duration 10                 # 3 nodes in this process (QUIC on loopback)
    macula-lab load --saturate --p99-bound 50 --duration 5   # steps of rising rate until p99 > 50 ms
    macula-lab load --attach quic://172.20.0.12:9443 --realm com.test.lab --certs-dir certs --rate 200
    macula-lab load --service math.add=3 --service test.calculator=1 --strategy random --strategy round_robin

The in-process lab is the multi-node testing guide's: node-1 and node-3 provide
``math.add`` (and ``test.calculator``), node-2 calls.  Attached, every node given
is called in turn (``--from`` picks some); calls go through each node, which
discovers, selects and fails over.  The report goes to stdout (``--json FILE``
for the machine-readable one, histograms included), progress to stderr.
See :mod:`macula_lab.lab.load` for what is measured and how.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from ..errors import MaculaError

DEFAULT_PROVIDERS = ("node-1", "node-3")
DEFAULT_SERVICES = ("math.add", "test.calculator")


def _weighted(values: list[str] | None, what: str) -> dict[str, float] | None:
    """``NAME`` or ``NAME=WEIGHT`` items as a mix."""
    if not values:
        return None
    out: dict[str, float] = {}
    for item in values:
        name, _, weight = item.partition("=")
        try:
            out[name] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {item!r}: the weight must be a number") from None
    return out


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rates must be numbers, got {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive")
    return sorted(rates)


def add_load_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``load`` on the ``macula-lab`` subcommands."""
    p = sub.add_parser(
        "load",
        help="open-loop load test (a rate, or a saturation search) against a lab",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
    )
    target = p.add_argument_group("target")
    target.add_argument("--nodes", type=int, default=3, help="in-process lab size (default 3)")
    target.add_argument(
        "--transport", choices=("quic", "memory"), default="quic", help="in-process lab transport"
    )
    target.add_argument(
        "--attach", metavar="URLS", help="attach to running nodes instead (quic://host:port, comma-separated)"
    )
    target.add_argument("--realm", default=os.environ.get("MACULA_REALM", "com.test.lab"))
    target.add_argument(
        "--ca", default=os.environ.get("MACULA_CA"), help="lab CA certificate (env MACULA_CA)"
    )
    target.add_argument(
        "--cert",
        default=os.environ.get("MACULA_CERT"),
        help="client certificate of the lab CA: `macula-lab certs issue-client NAME` (env MACULA_CERT)",
    )
    target.add_argument("--key", default=os.environ.get("MACULA_KEY"), help="its private key (env MACULA_KEY)")
    target.add_argument(
        "--certs-dir", default=None, metavar="DIR", help="DIR/ca.pem, DIR/lab.pem and DIR/lab.key"
    )
    target.add_argument("--insecure", action="store_true", help="do not verify the nodes' certificates")
    target.add_argument(
        "--from",
        dest="callers",
        action="append",
        metavar="NODE",
        help="call from this lab node (repeatable; default node-2 in process, every attached node)",
    )
    load = p.add_argument_group("load")
    load.add_argument("--rate", type=float, default=100.0, help="calls per second (default 100)")
    load.add_argument("--duration", type=float, default=10.0, help="seconds per run or step (default 10)")
    load.add_argument(
        "--warmup", type=float, default=1.0, help="seconds at the rate, not counted (default 1)"
    )
    load.add_argument(
        "--service",
        action="append",
        metavar="NAME[=WEIGHT]",
        help="service mix (repeatable; default math.add)",
    )
    load.add_argument(
        "--strategy",
        action="append",
        metavar="NAME[=WEIGHT]",
        help="selection strategy mix: random, round_robin, first, local_first, least_loaded (default: the node's)",
    )
    load.add_argument("--arrival", choices=("uniform", "poisson"), default="uniform")
    load.add_argument("--timeout", type=float, default=2.0, help="per attempt, seconds (default 2)")
    load.add_argument(
        "--max-attempts", type=int, default=None, help="failover attempts (default: the node's)"
    )
    load.add_argument("--max-in-flight", type=int, default=10_000)
    sat = p.add_argument_group("saturation search")
    sat.add_argument("--saturate", action="store_true", help="find the rate where p99 or errors pass a bound")
    sat.add_argument("--rates", type=_rates, help="the steps (comma-separated); default a doubling ramp")
    sat.add_argument("--start-rate", type=float, default=100.0)
    sat.add_argument("--factor", type=float, default=2.0)
    sat.add_argument("--max-rate", type=float, default=6400.0)
    sat.add_argument("--refine", type=int, default=2, help="bisecting steps after the ramp (default 2)")
    sat.add_argument(
        "--confirm", type=int, default=1, help="re-runs of a step past a bound before it counts (default 1)"
    )
    sat.add_argument("--p99-bound", type=float, default=50.0, help="milliseconds (default 50)")
    sat.add_argument("--max-errors", type=float, default=0.01, help="error rate bound (default 0.01)")
    sat.add_argument(
        "--min-throughput",
        type=float,
        default=0.9,
        help="saturated below this share of the offered rate finished in time (default 0.9)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the machine-readable result here")
    out.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def load_main(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level="WARNING", stream=sys.stderr)
    logging.getLogger("quic").setLevel(logging.ERROR)
    try:
        result = asyncio.run(_load(args))
    except (MaculaError, ValueError, argparse.ArgumentTypeError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if result is None:
        return 2
    print(result.text())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


async def _load(args: argparse.Namespace) -> Any:
    """The run's LoadResult or SaturationResult (None: bad arguments, already reported)."""
    from .lab import Lab
    from .load import LoadConfig, TextProgress, find_saturation, run_load

    services = _weighted(args.service, "service") or {"math.add": 1.0}
    strategies = _weighted(args.strategy, "strategy")
    if args.attach:
        if not (args.certs_dir or (args.ca and args.cert)) and not args.insecure:
            print(
                "error: give the lab CA and a client certificate (--ca, --cert, --key, or --certs-dir), "
                "or --insecure",
                file=sys.stderr,
            )
            return None
        lab = await Lab.attach(
            args.attach,
            realm=args.realm,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            certs=args.certs_dir,
            insecure=args.insecure,
            sample_interval=None,
        )
        callers = args.callers
    else:
        if args.nodes < 1:
            raise ValueError("--nodes must be >= 1")
        lab = await Lab.start(args.nodes, realm=args.realm, transport=args.transport, sample_interval=None)
        callers = args.callers or (["node-2"] if args.nodes >= 2 else ["node-1"])
    try:
        if not args.attach:
            providers = [n for n in DEFAULT_PROVIDERS if n in lab.names] or [lab.names[0]]
            for node in providers:
                for service in DEFAULT_SERVICES:
                    await lab.node(node).advertise(service, "calculator", ttl=300)
        for caller in callers or lab.names:  # warm every caller's cache and connections
            for service in services:
                await lab.node(caller).call(service, {"a": 1, "b": 2}, timeout=args.timeout)
        config = LoadConfig(
            rate=args.rate,
            duration=args.duration,
            warmup=args.warmup,
            services=services,
            strategies=strategies,
            callers=callers,
            timeout=args.timeout,
            max_attempts=args.max_attempts,
            arrival=args.arrival,
            max_in_flight=args.max_in_flight,
        )
        progress = None if args.quiet else TextProgress(sys.stderr)
        if args.saturate:
            result = await find_saturation(
                lab,
                config,
                rates=args.rates,
                start_rate=args.start_rate,
                factor=args.factor,
                max_rate=args.max_rate,
                p99_bound_ms=args.p99_bound,
                max_error_rate=args.max_errors,
                min_throughput=args.min_throughput,
                refine=args.refine,
                confirm=args.confirm,
                progress=progress,
            )
        else:
            result = await run_load(lab, config, progress=progress)
    finally:
        await lab.stop()
    return result
