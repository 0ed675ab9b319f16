"""Harness code shared by the benchmarks in this folder (transport.py, services.py, dht.py).

Not a benchmark itself.  The scripts import it as ``_common`` after putting this
folder on ``sys.path``.  Importing it also makes ``macula_lab`` importable from a
checkout that is not pip-installed.

What is here: progress logging, nearest-rank percentiles and medians, the
environment and its report line, markdown tables, PASS/MISS lines, JSON output,
command-line helpers, and the request-loop measurement (sequential latency,
throughput with K in flight) that transport.py and services.py share.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

try:  # a checkout that is not pip-installed: import the package from the tree
    import macula_lab  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

T = TypeVar("T")


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays a clean report."""
    print(msg, file=sys.stderr, flush=True)


def crashed(exc: BaseException, timeout: float, tag: str) -> str:
    """Log the traceback of a crashed (or hung: ``TimeoutError``) run; return its one-line error."""
    detail = str(exc) or f"no result within {timeout:g} s"
    log(f"{tag} CRASHED\n{traceback.format_exc()}")
    return f"{type(exc).__name__}: {detail}"


def run_timed(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` on the default loop, logging the total time."""
    t0 = time.perf_counter()
    out = asyncio.run(coro)
    log(f"total {time.perf_counter() - t0:.1f} s")
    return out


# ================================================================== statistics
def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100); NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def median(values: Iterable[float]) -> float:
    """The median of the values that are not NaN; NaN if there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


# ================================================================= environment
def environment(*packages: str, **extra: Any) -> dict[str, Any]:
    """Interpreter, platform, the versions of ``packages``, CPUs, event loop, then ``extra``."""

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        **{pkg: ver(pkg) for pkg in packages},
        "cpu_count": os.cpu_count(),
        "event_loop": type(asyncio.get_event_loop_policy()).__name__,
        **extra,
    }


def environment_line(env: dict[str, Any], parts: Sequence[str]) -> str:
    """The report's first line.  A part that is a key of ``env`` (a package) shows as "name version"."""
    shown = [f"{part} {env[part]}" if part in env else part for part in parts]
    return (
        f"environment: Python {env['python']} ({env['implementation']}), {', '.join(shown)}, "
        f"{env['cpu_count']} CPUs, {env['event_loop']} (no uvloop), {env['platform']}"
    )


# ====================================================================== report
def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table: the first column left-aligned, the others right-aligned.

    A column is as wide as its widest cell; pad a header cell to fix a minimum width.
    """
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i < 1 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = "|" + "|".join("-" * (w + 2) if i < 1 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return [line(header), rule, *(line(r) for r in rows)]


def verdict(value: float, ok: bool, judged: bool = True) -> str:
    """``n/a`` (NaN: a side crashed), ``info`` (not judged), else ``PASS`` / ``MISS``."""
    if math.isnan(value):
        return "n/a"
    if not judged:
        return "info"
    return "PASS" if ok else "MISS"


def verdict_lines(rows: Iterable[tuple[str, str, str, str]], target_width: int = 0) -> list[str]:
    """``label  figure  (target T)  VERDICT`` lines from (label, figure, target, verdict), aligned.

    Labels are left-aligned, figures right-aligned; a target ``-`` leaves its column blank.
    """
    rows = list(rows)
    targets = [f"(target {t})" if t != "-" else "" for _, _, t, _ in rows]
    width = max((len(r[0]) for r in rows), default=0)
    sw = max((len(r[1]) for r in rows), default=0)
    tw = max(target_width, *map(len, targets)) if targets else 0
    return [
        f"{label:<{width}}  {shown:>{sw}}  {target:<{tw}}  {v}"
        for (label, shown, _, v), target in zip(rows, targets, strict=True)
    ]


def write_json(path: str, doc: dict[str, Any]) -> None:
    """Write ``doc`` as indented JSON; NaN (a figure of a crashed run) becomes null."""
    Path(path).write_text(json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ========================================================================= CLI
def parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser of a benchmark, described by its docstring's first paragraph."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write all figures to this JSON file")


def quick_defaults(args: argparse.Namespace, **defaults: tuple[Any, Any]) -> None:
    """Fill each option left unset (None) with its (full run, ``--quick``) default."""
    for opt, (full, quick) in defaults.items():
        if getattr(args, opt) is None:
            setattr(args, opt, quick if args.quick else full)


def require_positive(p: argparse.ArgumentParser, args: argparse.Namespace, *opts: str) -> None:
    for opt in opts:
        if getattr(args, opt) < 1:
            p.error(f"--{opt} must be >= 1")


def system_list(
    p: argparse.ArgumentParser, systems: str, all_systems: Sequence[str], allow_empty: bool = True
) -> list[str]:
    """The ``--systems`` value as a list, every name checked against ``all_systems``."""
    names = [s.strip() for s in systems.split(",") if s.strip()]
    unknown = [s for s in names if s not in all_systems]
    if unknown or not (names or allow_empty):
        p.error(f"unknown system(s) {unknown}; choose from {list(all_systems)}")
    return names


# ============================================ request loops (transport, services)
# Both measure a ``call()`` coroutine the same way: warm-up, sequential latency
# (p50/p99 of N calls one at a time) and throughput (N calls, K outstanding),
# repeated over rounds; the median across rounds is reported.
def parse_load_args(
    doc: str,
    argv: list[str] | None,
    *,
    unit: str,
    rounds: int,
    all_systems: Sequence[str],
    timeout_help: str,
    quick_help: str,
    systems_help: str,
) -> argparse.Namespace:
    """The options of a request benchmark; ``unit`` ("requests" or "calls") and the help texts vary.

    --requests/-n, --inflight, --payload, --warmup, --rounds (default ``rounds``), --timeout,
    --quick, --systems, --json; ``args.system_list`` is the checked ``--systems``.
    """
    p = parser(doc)
    p.add_argument(
        "--requests",
        "-n",
        type=int,
        default=None,
        help=f"{unit} per measurement (default 2000; 1000 with --quick)",
    )
    p.add_argument(
        "--inflight", type=int, default=64, help=f"concurrent {unit} in the throughput test (default 64)"
    )
    p.add_argument("--payload", type=int, default=64, help="payload size in bytes (default 64)")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"warm-up {unit} per pattern (default 200; 100 with --quick)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"repetitions; the median is reported (default {rounds}; 1 with --quick)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help=timeout_help)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--systems", default=",".join(all_systems), help=systems_help)
    add_json_option(p)
    args = p.parse_args(argv)
    quick_defaults(args, requests=(2000, 1000), warmup=(200, 100), rounds=(rounds, 1))
    require_positive(p, args, "requests", "inflight", "rounds")
    if args.payload < 0 or args.warmup < 0:
        p.error("--payload and --warmup must be >= 0")
    args.system_list = system_list(p, args.systems, all_systems)
    return args


def write_load_json(
    path: str,
    env: dict[str, Any],
    args: argparse.Namespace,
    results: dict[str, SystemResult],
    **verdicts: list[Any],
) -> None:
    """Environment, config, per-system medians and rounds, then ``verdicts`` (dataclass rows) by name."""
    doc = {
        "environment": env,
        "config": {
            k: getattr(args, k) for k in ("requests", "inflight", "payload", "warmup", "rounds", "quick")
        },
        "results": {name: res.to_json() for name, res in results.items()},
        **{key: [asdict(r) for r in rows] for key, rows in verdicts.items()},
    }
    write_json(path, doc)


@dataclass
class RoundResult:
    seq_p50_us: float
    seq_p99_us: float
    throughput_rps: float


@dataclass
class SystemResult:
    name: str
    rounds: list[RoundResult] = field(default_factory=list)
    error: str | None = None

    def median(self, metric: str) -> float:
        return median(getattr(r, metric) for r in self.rounds)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq_p50_us": self.median("seq_p50_us"),
            "seq_p99_us": self.median("seq_p99_us"),
            "throughput_rps": self.median("throughput_rps"),
            "rounds": [asdict(r) for r in self.rounds],
            "error": self.error,
        }


async def sequential(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    """Latencies (µs) of ``n`` calls made one after the other."""
    clock = time.perf_counter_ns
    out: list[float] = []
    for _ in range(n):
        t0 = clock()
        await call()
        out.append((clock() - t0) / 1000)
    return out


async def concurrent(call: Callable[[], Awaitable[Any]], n: int, inflight: int) -> float:
    """Calls per second for ``n`` calls with ``inflight`` workers keeping one call outstanding each."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(inflight, n))))
    return n / (time.perf_counter() - t0)


async def measure(call: Callable[[], Awaitable[Any]], args: argparse.Namespace) -> RoundResult:
    """Warm-up, then sequential latency and throughput of ``call`` (``--warmup/--requests/--inflight``)."""
    # warm-up both patterns: connection setup, stream credit, caches, allocator
    await sequential(call, args.warmup)
    await concurrent(call, args.warmup, args.inflight)
    gc.collect()
    latencies = sorted(await sequential(call, args.requests))
    gc.collect()
    rps = await concurrent(call, args.requests, args.inflight)
    return RoundResult(percentile(latencies, 50), percentile(latencies, 99), rps)


def log_round(tag: str, name: str, width: int, r: RoundResult, t0: float) -> None:
    """One progress line per measured round; ``t0`` is when the round started (perf_counter)."""
    log(
        f"{tag} {name:<{width}} seq p50 {r.seq_p50_us:8.1f} µs  "
        f"p99 {r.seq_p99_us:8.1f} µs  {r.throughput_rps:9.1f} req/s  "
        f"({time.perf_counter() - t0:.1f} s)"
    )


def results_table(results: dict[str, SystemResult], name_width: int) -> list[str]:
    """system | seq p50 µs | seq p99 µs | throughput req/s, the medians over rounds."""
    rows = []
    for res in results.values():
        if res.error is not None and not res.rounds:
            rows.append([res.name, "CRASHED", "", ""])
            continue
        figures = (res.median("seq_p50_us"), res.median("seq_p99_us"), res.median("throughput_rps"))
        rows.append([res.name, *(f"{v:.1f}" for v in figures)])
    # the system column is as wide as the longest system name, run or not
    return table(["system".ljust(name_width), "seq p50 µs", "seq p99 µs", "throughput req/s"], rows)
