"""Open-loop load generation against a lab or nodes: ``macula-lab load`` and ``notebooks/08_load.ipynb``.

In a notebook cell (the kernel's loop is running)::

    from macula_lab.lab.load import LoadConfig, run_load, find_saturation
    result = await run_load(lab, LoadConfig(rate=200, duration=10, services={"math.add": 1},
                                            callers=["node-2"]))
    result                       # the report: latency percentiles, errors, per service and strategy
    result.plot()                # latency percentiles, throughput and errors over time
    sat = await find_saturation(lab, LoadConfig(duration=5, callers=["node-2"]), p99_bound_ms=50)
    sat                          # the saturation table: rate, achieved, p50, p99, errors

**Open loop.**  Calls are sent at the target rate whether or not earlier ones
have answered (intended send times ``t0 + i / rate``, or Poisson arrivals),
as users of a service arrive; a closed-loop tool (N workers each waiting for
its reply, like ``bench/services.py``, or a ``locust`` user that waits) slows
down with the system and so never sees the queue it would have built.

**Coordinated omission.**  Every latency is measured from the call's
*intended* send time, not from when it was actually sent: when the generator
(or the loop it shares with an in-kernel lab) falls behind, the wait counts,
as with ``wrk2``.  The uncorrected figures (from the actual send) are kept
beside them (``service_time``) to show the difference.

**Percentiles** come from HDR histograms (the ``hdrhistogram`` package:
microsecond resolution, 3 significant digits, 1 µs to 1 hour), overall, per
service, per time window, and mergeable (``LoadResult.to_dict`` carries them
encoded).  Latency percentiles are of successful calls; failed calls are
counted by error type and in the error rate.

Targets: a :class:`~macula_lab.lab.lab.Lab` (its nodes, local or attached;
``callers`` picks some by name), a lab node, a :class:`~macula_lab.runtime.node.Node`,
an attached :class:`~macula_lab.lab.client.Client`, or a list of them: anything
with ``call(service, args, *, strategy=None, timeout=..., max_attempts=None)``.
The generator runs on the caller's event loop: against an in-kernel lab it
shares the loop (and the CPU) with the nodes, so the saturation point is that
of the whole process; attached to nodes elsewhere it measures them.
"""

from __future__ import annotations

import asyncio
import html
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TextIO

from hdrh.histogram import HdrHistogram

__all__ = [
    "LoadConfig",
    "LoadResult",
    "SaturationResult",
    "find_saturation",
    "run_closed_loop",
    "run_load",
]

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour
DIGITS = 3
WINDOW_DIGITS = 2  # per-window histograms: 1 % resolution keeps them small
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


# ------------------------------------------------------------------ config
@dataclass
class LoadConfig:
    """What to send: rate, duration, service and strategy mixes, and the bounds.

    ``services`` and ``strategies`` are mixes: a name, a list (equal weights) or
    ``{name: weight}``; strategy ``None`` is the calling node's default.
    ``args`` are the call arguments: one value for every call, or ``fn(service, i)``;
    ``service_args`` gives some services their own.  ``callers`` names the lab nodes to call from (round
    robin; default every running node).  ``timeout`` bounds each attempt,
    ``max_attempts`` the failover (the node's default: up to 3).  ``warmup``
    seconds at the rate come first and are left out of the figures.
    ``max_in_flight`` caps outstanding calls: a call due while the cap is
    reached is not sent and counts as a ``TooManyInFlight`` error.
    """

    rate: float = 100.0
    duration: float = 10.0
    services: str | Sequence[str] | Mapping[str, float] = "math.add"
    strategies: str | None | Sequence[str | None] | Mapping[str | None, float] = None
    args: Any = field(default_factory=lambda: {"a": 1, "b": 2})
    service_args: Mapping[str, Any] | None = None
    callers: Sequence[str] | None = None
    timeout: float = 2.0
    max_attempts: int | None = None
    arrival: str = "uniform"  # or "poisson"
    warmup: float = 0.0
    window: float = 1.0
    max_in_flight: int = 10_000
    drain: float | None = None  # seconds to wait for outstanding calls at the end (default: their deadline)
    seed: int | None = 0

    def validate(self) -> LoadConfig:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number of calls per second, got {self.rate!r}")
        if not (self.duration > 0 and math.isfinite(self.duration)):
            raise ValueError(f"duration must be a positive number of seconds, got {self.duration!r}")
        if self.warmup < 0 or self.window <= 0 or self.timeout <= 0 or self.max_in_flight < 1:
            raise ValueError("warmup >= 0, window > 0, timeout > 0 and max_in_flight >= 1 are required")
        if self.arrival not in ("uniform", "poisson"):
            raise ValueError(f"arrival must be 'uniform' or 'poisson', got {self.arrival!r}")
        _mix(self.services, "services")
        _mix(self.strategies, "strategies")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["services"] = dict(_mix(self.services, "services"))
        d["strategies"] = {str(k): v for k, v in _mix(self.strategies, "strategies")}
        if callable(self.args):
            d["args"] = getattr(self.args, "__name__", "callable")
        d["service_args"] = dict(self.service_args) if self.service_args else None
        return d


def _mix(spec: Any, what: str) -> list[tuple[Any, float]]:
    """A mix as [(item, weight)]: a single item, a list (equal weights) or a mapping."""
    if spec is None or isinstance(spec, str):
        items = [(spec, 1.0)]
    elif isinstance(spec, Mapping):
        items = [(k, float(v)) for k, v in spec.items()]
    else:
        items = [(k, 1.0) for k in spec]
    if not items or any(w < 0 or not math.isfinite(w) for _, w in items) or sum(w for _, w in items) <= 0:
        raise ValueError(f"{what} must name at least one item with a positive weight, got {spec!r}")
    if what == "services" and any(not isinstance(k, str) or not k for k, _ in items):
        raise ValueError(f"services must be service names, got {spec!r}")
    return items


class _Picker:
    """Weighted choice from a mix (deterministic for a seed)."""

    def __init__(self, spec: Any, what: str, rng: random.Random):
        items = [(k, w) for k, w in _mix(spec, what) if w > 0]
        self.items = [k for k, _ in items]
        self.weights = [w for _, w in items]
        self.rng = rng

    def __call__(self) -> Any:
        if len(self.items) == 1:
            return self.items[0]
        return self.rng.choices(self.items, self.weights)[0]


# --------------------------------------------------------------- recording
def _hist(digits: int = DIGITS) -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, digits)


def _us(seconds: float) -> int:
    return min(HIGHEST_US, max(LOWEST_US, round(seconds * 1e6)))


def _ms(h: HdrHistogram, percentile: float) -> float | None:
    return h.get_value_at_percentile(percentile) / 1000.0 if h.get_total_count() else None


@dataclass
class _Window:
    """One time window (by completion time) of the run."""

    start: float  # seconds since the run started
    hist: HdrHistogram = field(default_factory=lambda: _hist(WINDOW_DIGITS))
    sent: int = 0
    ok: int = 0
    errors: int = 0
    warmup: bool = False

    def row(self, window: float, in_flight: int | None = None) -> dict[str, Any]:
        done = self.ok + self.errors
        return {
            "t": round(self.start, 3),
            "sent": self.sent,
            "completed": done,
            "ok": self.ok,
            "errors": self.errors,
            "throughput": done / window,
            "error_rate": self.errors / done if done else 0.0,
            "p50_ms": _ms(self.hist, 50),
            "p90_ms": _ms(self.hist, 90),
            "p99_ms": _ms(self.hist, 99),
            "max_ms": self.hist.get_max_value() / 1000.0 if self.hist.get_total_count() else None,
            "in_flight": in_flight,
            "warmup": self.warmup,
        }


class _Recorder:
    def __init__(self, cfg: LoadConfig, start: float):
        self.cfg = cfg
        self.start = start
        self.measure_from = start + cfg.warmup
        self.measure_until = self.measure_from + cfg.duration
        self.ok_in_period = 0  # successful calls that finished within the measured period
        self.latency = _hist()
        self.service_time = _hist()
        self.send_lag = _hist()  # how late the generator sent calls (intended -> actual)
        self.per_service: dict[str, list] = {}  # name -> [hist, ok, errors]
        self.per_strategy: dict[str, list] = {}
        self.errors: Counter[str] = Counter()
        self.sent = 0
        self.measured_sent = 0
        self.ok = 0
        self.failed = 0
        self.windows: dict[int, _Window] = {}
        self.first_error: dict[str, str] = {}

    def window(self, at: float) -> _Window:
        index = max(0, int((at - self.start) / self.cfg.window))
        w = self.windows.get(index)
        if w is None:
            begin = self.start + index * self.cfg.window
            w = self.windows[index] = _Window(index * self.cfg.window, warmup=begin < self.measure_from)
        return w

    def launched(self, intended: float) -> None:
        self.sent += 1
        if intended >= self.measure_from:
            self.measured_sent += 1
        self.window(intended).sent += 1

    def done(
        self,
        intended: float,
        sent: float,
        done: float,
        service: str,
        strategy: str | None,
        error: BaseException | str | None,
    ) -> None:
        w = self.window(done)
        measured = intended >= self.measure_from
        if error is None:
            w.ok += 1
            w.hist.record_value(_us(done - intended))
            if self.measure_from <= done < self.measure_until:
                self.ok_in_period += 1
        else:
            w.errors += 1
        if not measured:
            return
        svc = self.per_service.get(service)
        if svc is None:  # (not setdefault: a histogram is too costly to build for every call)
            svc = self.per_service[service] = [_hist(), 0, 0]
        label = strategy or "(node default)"
        strat = self.per_strategy.get(label)
        if strat is None:
            strat = self.per_strategy[label] = [_hist(), 0, 0]
        if error is None:
            self.ok += 1
            us = _us(done - intended)
            self.latency.record_value(us)
            self.service_time.record_value(_us(done - sent))
            self.send_lag.record_value(_us(sent - intended))
            for row in (svc, strat):
                row[0].record_value(us)
                row[1] += 1
        else:
            self.failed += 1
            name = error if isinstance(error, str) else type(error).__name__
            self.errors[name] += 1
            if name not in self.first_error:
                self.first_error[name] = name if isinstance(error, str) else f"{name}: {error}"[:300]
            svc[2] += 1
            strat[2] += 1


# ------------------------------------------------------------------ results
def _percentiles(h: HdrHistogram) -> dict[str, float | None]:
    out = {f"p{p:g}_ms": _ms(h, p) for p in PERCENTILES}
    out["max_ms"] = h.get_max_value() / 1000.0 if h.get_total_count() else None
    out["mean_ms"] = h.get_mean_value() / 1000.0 if h.get_total_count() else None
    return out


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


@dataclass
class LoadResult:
    """One open-loop run: what was sent, what came back, how fast (see the module docstring)."""

    config: LoadConfig
    target: str
    started_at: float  # wall clock
    elapsed: float  # seconds, sending and draining
    sent: int  # calls sent after the warm-up
    ok: int
    failed: int
    errors: dict[str, int]
    first_errors: dict[str, str]
    latency: HdrHistogram = field(repr=False)  # from the intended send time (successful calls)
    service_time: HdrHistogram = field(repr=False)  # from the actual send time
    send_lag: HdrHistogram = field(repr=False)
    per_service: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_strategy: dict[str, dict[str, Any]] = field(default_factory=dict)
    windows: list[dict[str, Any]] = field(default_factory=list)
    concurrency: int | None = None  # closed loop: the workers (None: open loop)
    ok_in_period: int = 0  # successful calls that finished within the measured period

    # ----------------------------------------------------------- figures
    @property
    def completed(self) -> int:
        return self.ok + self.failed

    @property
    def error_rate(self) -> float:
        return self.failed / self.completed if self.completed else 0.0

    @property
    def achieved_rate(self) -> float:
        """Throughput: successful calls that *finished* within the measured period, per second.

        Past saturation it stays at what the system can do while the offered rate
        grows (the rest finish after the run, or time out).
        """
        return self.ok_in_period / self.config.duration

    def percentile_ms(self, p: float, *, corrected: bool = True) -> float | None:
        return _ms(self.latency if corrected else self.service_time, p)

    @property
    def p50_ms(self) -> float | None:
        return self.percentile_ms(50)

    @property
    def p99_ms(self) -> float | None:
        return self.percentile_ms(99)

    def summary(self) -> dict[str, Any]:
        """The one-line figures (what a saturation step reports)."""
        lat = _percentiles(self.latency)
        raw = _percentiles(self.service_time)
        return {
            "mode": "open" if self.concurrency is None else f"closed ({self.concurrency} workers)",
            "rate": self.config.rate if self.concurrency is None else None,
            "achieved": round(self.achieved_rate, 1),
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.failed,
            "error_rate": self.error_rate,
            **lat,
            "uncorrected_p50_ms": raw["p50_ms"],
            "uncorrected_p99_ms": raw["p99_ms"],
            "send_lag_p99_ms": _ms(self.send_lag, 99),
        }

    # ----------------------------------------------------------- reports
    def to_dict(self) -> dict[str, Any]:
        """JSON-able, histograms included (HdrHistogram encodings: ``HdrHistogram.decode``)."""
        return {
            "config": self.config.to_dict(),
            "target": self.target,
            "started_at": self.started_at,
            "elapsed": self.elapsed,
            "summary": self.summary(),
            "errors": dict(self.errors),
            "first_errors": dict(self.first_errors),
            "per_service": self.per_service,
            "per_strategy": self.per_strategy,
            "windows": self.windows,
            "hdr": {
                "latency": _encode(self.latency),
                "service_time": _encode(self.service_time),
            },
        }

    def text(self) -> str:
        c = self.config
        warm = f", {c.warmup:g} s warm-up" if c.warmup else ""
        if self.concurrency is None:
            head = f"open-loop load: {c.rate:g} calls/s for {c.duration:g} s ({c.arrival} arrivals{warm})"
        else:
            head = f"closed-loop load: {self.concurrency} workers for {c.duration:g} s ({warm[2:] or 'no warm-up'})"
        lines = [
            f"{head} against {self.target}",
            f"sent {self.sent}, ok {self.ok}, errors {self.failed} ({self.error_rate:.2%}); "
            f"achieved {self.achieved_rate:.1f} ok/s",
            "",
            "| latency (ms) | p50 | p90 | p99 | p99.9 | max | mean |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, h in (
            ("from intended send (corrected)", self.latency),
            ("from actual send (uncorrected)", self.service_time),
            ("generator send lag", self.send_lag),
        ):
            p = _percentiles(h)
            cells = [p["p50_ms"], p["p90_ms"], p["p99_ms"], p["p99.9_ms"], p["max_ms"], p["mean_ms"]]
            lines.append(f"| {label} | " + " | ".join(_fmt(v, 3) for v in cells) + " |")
        for title, rows in (("service", self.per_service), ("strategy", self.per_strategy)):
            if len(rows) > 1 or title == "service":
                lines += ["", f"| {title} | ok | errors | p50 ms | p99 ms |", "|---|---|---|---|---|"]
                for name, r in rows.items():
                    lines.append(
                        f"| {name} | {r['ok']} | {r['errors']} | {_fmt(r['p50_ms'], 3)} | {_fmt(r['p99_ms'], 3)} |"
                    )
        if self.errors:
            lines += ["", "errors:"]
            lines += [f"  {n} x {name}: {self.first_errors.get(name, '')}" for name, n in self.errors.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        return _markdownish_html(self.text())

    def plot(self, title: str | None = None):
        """Latency percentiles, throughput and error rate per window (plotly, the ``notebook`` extra)."""
        default = (
            f"Open-loop load at {self.config.rate:g} calls/s"
            if self.concurrency is None
            else f"Closed-loop load, {self.concurrency} workers"
        )
        return _plot_windows(self.windows, title or default)


def _encode(h: HdrHistogram) -> str | None:
    if not h.get_total_count():
        return None
    data = h.encode()
    return data.decode() if isinstance(data, bytes) else str(data)


def _markdownish_html(text: str) -> str:
    """Markdown tables of ``text`` as HTML tables, other lines as paragraphs."""
    out, table = [], []

    def flush():
        if table:
            head, *body = [
                [c.strip() for c in row.strip("|").split("|")] for row in table if "---" not in row
            ]
            cells = "".join(f"<th>{html.escape(c)}</th>" for c in head)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
            out.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{rows}</tbody></table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<div>{html.escape(line)}</div>")
    flush()
    return "<div class='macula-load'>" + "".join(out) + "</div>"


# ----------------------------------------------------------------- progress
class TextProgress:
    """A one-line progress bar with the last window's figures (a terminal: redrawn; a log: one line a window)."""

    def __init__(self, stream: TextIO | None = None, width: int = 24):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, snap: dict[str, Any]) -> None:
        frac = min(1.0, snap["elapsed"] / snap["total"]) if snap["total"] else 1.0
        bar = "#" * round(frac * self.width)
        w = snap.get("window") or {}
        line = (
            f"[{bar:<{self.width}}] {snap['elapsed']:5.1f}/{snap['total']:g}s "
            f"rate {snap['rate']:g}/s sent {snap['sent']} ok {snap['ok']} err {snap['errors']} "
            f"in-flight {snap['in_flight']}  last {snap['window_s']:g}s: "
            f"p50 {_fmt(w.get('p50_ms'))} p99 {_fmt(w.get('p99_ms'))} ms, {w.get('error_rate', 0):.1%} errors"
        )
        if self.tty:
            self.stream.write("\r" + line[:200] + ("\n" if snap.get("final") else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class NotebookProgress:
    """A progress bar and a live table of the windows in a notebook (ipywidgets; else printed lines)."""

    def __init__(self, title: str = "load", keep: int = 8):
        self.keep = keep
        try:
            import ipywidgets as widgets
            from IPython.display import display
        except ImportError:  # pragma: no cover - the notebook extra is not installed
            self.bar = None
            self.printer = TextProgress(sys.stdout)
            return
        self.bar = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description=title)
        self.label = widgets.HTML()
        display(widgets.VBox([self.bar, self.label]))

    def __call__(self, snap: dict[str, Any]) -> None:
        if self.bar is None:
            self.printer(snap)
            return
        self.bar.value = min(1.0, snap["elapsed"] / snap["total"]) if snap["total"] else 1.0
        rows = snap["windows"][-self.keep :]
        head = "".join(
            f"<th>{h}</th>" for h in ("t (s)", "sent", "ok", "errors", "p50 ms", "p90 ms", "p99 ms", "max ms")
        )
        body = "".join(
            "<tr>"
            + "".join(
                f"<td>{_fmt(r[k]) if k != 't' else r[k]}</td>"
                for k in ("t", "sent", "ok", "errors", "p50_ms", "p90_ms", "p99_ms", "max_ms")
            )
            + "</tr>"
            for r in rows
        )
        self.label.value = (
            f"<div>rate {snap['rate']:g}/s &middot; sent {snap['sent']} &middot; ok {snap['ok']} "
            f"&middot; errors {snap['errors']} &middot; in flight {snap['in_flight']}</div>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )


def _auto_progress(title: str):
    try:
        from IPython import get_ipython

        if get_ipython() is not None and "IPKernelApp" in get_ipython().config:
            return NotebookProgress(title)
    except ImportError:
        pass
    return TextProgress() if sys.stderr.isatty() else None


# ------------------------------------------------------------------ callers
def _callers(target: Any, names: Sequence[str] | None) -> tuple[list[Any], str]:
    """The objects to call from, and a label for the report."""
    if hasattr(target, "running_nodes") and hasattr(target, "node"):  # a Lab
        if names:
            nodes = [target.node(n) for n in names]
        else:
            nodes = list(target.running_nodes())
        if not nodes:
            raise ValueError("the lab has no running node to call from")
        mode = getattr(target, "mode", "lab")
        return nodes, f"{mode} lab, calling from {', '.join(n.name for n in nodes)}"
    items = list(target) if isinstance(target, list | tuple) else [target]
    if not items or not all(callable(getattr(t, "call", None)) for t in items):
        raise TypeError("the target must be a Lab, or node(s)/client(s) with a call() method")
    if names:
        raise ValueError("callers names lab nodes: give a Lab, or pass the nodes themselves")
    label = ", ".join(str(getattr(t, "name", type(t).__name__)) for t in items)
    return items, label


# --------------------------------------------------------------------- run
async def run_load(
    target: Any,
    config: LoadConfig | None = None,
    *,
    progress: Callable[[dict[str, Any]], None] | str | None = "auto",
    **overrides: Any,
) -> LoadResult:
    """Send calls at ``config.rate`` for ``config.duration`` seconds (open loop); see the module docstring.

    ``overrides`` replace fields of ``config`` (``run_load(lab, rate=500)``).
    ``progress``: ``"auto"`` (a widget in a notebook, a line on a terminal,
    nothing otherwise), None, or ``fn(snapshot)`` called once per window.
    """
    cfg = replace(config or LoadConfig(), **overrides).validate()
    callers, label = _callers(target, cfg.callers)
    if progress == "auto":
        progress = _auto_progress(f"{cfg.rate:g}/s")
    elif isinstance(progress, str):
        raise ValueError("progress must be 'auto', None or a callable")
    rng = random.Random(cfg.seed)
    pick_service = _Picker(cfg.services, "services", rng)
    pick_strategy = _Picker(cfg.strategies, "strategies", rng)
    args_for = _args_function(cfg.args, cfg.service_args)
    loop = asyncio.get_running_loop()
    started_at = time.time()
    start = loop.time() + 0.005
    rec = _Recorder(cfg, start)
    total = cfg.warmup + cfg.duration
    end = start + total
    pending: set[asyncio.Task] = set()

    async def one(caller: Any, service: str, strategy: str | None, args: Any, intended: float) -> None:
        sent = loop.time()
        error: BaseException | None = None
        try:
            await caller.call(
                service, args, strategy=strategy, timeout=cfg.timeout, max_attempts=cfg.max_attempts
            )
        except Exception as exc:  # the call's outcome, counted by type
            error = exc
        rec.done(intended, sent, loop.time(), service, strategy, error)

    def tick(final: bool = False) -> None:
        if progress is None:
            return
        now = loop.time()
        windows = [w.row(cfg.window) for _, w in sorted(rec.windows.items())]
        current = int((now - start) / cfg.window)
        shown = [r for r in windows if r["t"] < current * cfg.window or final]
        snap = {
            "elapsed": min(total, now - start),
            "total": total,
            "rate": cfg.rate,
            "sent": rec.sent,
            "ok": sum(r["ok"] for r in windows),
            "errors": sum(r["errors"] for r in windows),
            "in_flight": len(pending),
            "window": shown[-1] if shown else None,
            "window_s": cfg.window,
            "windows": shown,
            "final": final,
        }
        try:
            progress(snap)
        except Exception:  # a broken display must not break the run
            pass

    i = 0
    intended = start
    next_tick = start + cfg.window
    while intended < end:
        now = loop.time()
        if now >= next_tick:
            tick()
            next_tick += cfg.window * max(1, math.floor((now - next_tick) / cfg.window) + 1)
        if intended > now:
            await asyncio.sleep(min(intended, next_tick) - now)
            continue
        while intended <= now and intended < end:  # everything due (catching up when behind)
            rec.launched(intended)
            if len(pending) >= cfg.max_in_flight:
                rec.done(intended, now, now, pick_service(), pick_strategy(), "TooManyInFlight")
            else:
                service = pick_service()
                caller = callers[i % len(callers)]
                task = loop.create_task(one(caller, service, pick_strategy(), args_for(service, i), intended))
                pending.add(task)
                task.add_done_callback(pending.discard)
            i += 1
            if cfg.arrival == "uniform":
                intended = start + i / cfg.rate
            else:
                intended += rng.expovariate(cfg.rate)
        await asyncio.sleep(0)  # let the calls just started run before sending more
    drain = cfg.drain if cfg.drain is not None else cfg.timeout * (cfg.max_attempts or 3) + 3.0
    if pending:
        deadline = loop.time() + drain
        while pending and loop.time() < deadline:
            await asyncio.wait(set(pending), timeout=min(cfg.window, max(0.0, deadline - loop.time())))
            if pending and loop.time() >= next_tick:
                tick()
                next_tick += cfg.window
    for task in list(pending):
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    # calls cancelled at the end never recorded themselves: count them as unfinished
    unfinished = rec.measured_sent - (rec.ok + rec.failed)
    if unfinished > 0:
        rec.failed += unfinished
        rec.errors["Unfinished"] += unfinished
        rec.first_error.setdefault("Unfinished", f"no outcome within {drain:g} s after the run")
    tick(final=True)
    return LoadResult(
        config=cfg,
        target=label,
        started_at=started_at,
        elapsed=loop.time() - start,
        sent=rec.measured_sent,
        ok=rec.ok,
        failed=rec.failed,
        errors=dict(rec.errors),
        first_errors=dict(rec.first_error),
        latency=rec.latency,
        service_time=rec.service_time,
        send_lag=rec.send_lag,
        per_service=_rows(rec.per_service),
        per_strategy=_rows(rec.per_strategy),
        windows=[w.row(cfg.window) for _, w in sorted(rec.windows.items())],
        ok_in_period=rec.ok_in_period,
    )


def _rows(groups: dict[str, list]) -> dict[str, dict[str, Any]]:
    return {
        name: {"ok": ok, "errors": errors, **_percentiles(h)}
        for name, (h, ok, errors) in sorted(groups.items())
    }


def _args_function(args: Any, per_service: Mapping[str, Any] | None) -> Callable[[str, int], Any]:
    default = args if callable(args) else (lambda service, i: args)
    if not per_service:
        return default
    return lambda service, i: per_service[service] if service in per_service else default(service, i)


async def run_closed_loop(
    target: Any,
    config: LoadConfig | None = None,
    *,
    concurrency: int = 1,
    **overrides: Any,
) -> LoadResult:
    """``concurrency`` workers, each sending its next call when its previous one answered.

    What ``bench/services.py`` (and a ``locust`` user without wait time) does:
    there is no intended send time, so latency is the service time, and the
    rate is whatever the system gives (``config.rate`` is ignored).  Shown next
    to :func:`run_load` to see the difference.
    """
    cfg = replace(config or LoadConfig(), **overrides).validate()
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    callers, label = _callers(target, cfg.callers)
    rng = random.Random(cfg.seed)
    pick_service = _Picker(cfg.services, "services", rng)
    pick_strategy = _Picker(cfg.strategies, "strategies", rng)
    args_for = _args_function(cfg.args, cfg.service_args)
    loop = asyncio.get_running_loop()
    started_at = time.time()
    start = loop.time()
    rec = _Recorder(cfg, start)
    end = start + cfg.warmup + cfg.duration
    counter = iter(range(sys.maxsize))

    async def worker(w: int) -> None:
        while True:
            sent = loop.time()
            if sent >= end:
                return
            i = next(counter)
            service, strategy = pick_service(), pick_strategy()
            rec.launched(sent)
            error: BaseException | None = None
            try:
                await callers[(w + i) % len(callers)].call(
                    service,
                    args_for(service, i),
                    strategy=strategy,
                    timeout=cfg.timeout,
                    max_attempts=cfg.max_attempts,
                )
            except Exception as exc:
                error = exc
            rec.done(sent, sent, loop.time(), service, strategy, error)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return LoadResult(
        config=cfg,
        target=label,
        started_at=started_at,
        elapsed=loop.time() - start,
        sent=rec.measured_sent,
        ok=rec.ok,
        failed=rec.failed,
        errors=dict(rec.errors),
        first_errors=dict(rec.first_error),
        latency=rec.latency,
        service_time=rec.service_time,
        send_lag=rec.send_lag,
        per_service=_rows(rec.per_service),
        per_strategy=_rows(rec.per_strategy),
        windows=[w.row(cfg.window) for _, w in sorted(rec.windows.items())],
        concurrency=concurrency,
        ok_in_period=rec.ok_in_period,
    )


# -------------------------------------------------------------- saturation
@dataclass
class SaturationResult:
    """Steps of increasing rate until p99 or the error rate passed its bound."""

    steps: list[LoadResult]
    p99_bound_ms: float
    max_error_rate: float
    saturated_at: float | None  # the first rate that passed a bound (None: none did)
    sustainable: float | None  # the highest rate within the bounds
    min_throughput: float = 0.9  # achieved / offered below this is saturation too

    def rows(self) -> list[dict[str, Any]]:
        out, seen = [], set()
        for step in self.steps:
            s = step.summary()
            within = _within(step, self.p99_bound_ms, self.max_error_rate, self.min_throughput)
            out.append({**s, "within_bounds": within, "rerun": s["rate"] in seen})
            seen.add(s["rate"])
        return out

    def table(self) -> Any:
        """The steps as a pandas DataFrame (or the rows when pandas is missing)."""
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover
            return self.rows()
        return pd.DataFrame(self.rows())

    def text(self) -> str:
        lines = [
            f"saturation search: p99 bound {self.p99_bound_ms:g} ms, error bound {self.max_error_rate:.1%}, "
            f"throughput at least {self.min_throughput:.0%} of the offered rate",
            "",
            "| rate /s | achieved ok/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | error % | uncorrected p99 ms | within bounds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows():
            lines.append(
                f"| {r['rate']:g} | {r['achieved']:.1f} | {_fmt(r['p50_ms'], 3)} | {_fmt(r['p99_ms'], 3)} | "
                f"{_fmt(r['p99.9_ms'], 3)} | {_fmt(r['max_ms'], 3)} | {r['errors']} | {r['error_rate']:.2%} | "
                f"{_fmt(r['uncorrected_p99_ms'], 3)} | {'yes' if r['within_bounds'] else 'NO'}"
                f"{' (re-run)' if r['rerun'] else ''} |"
            )
        lines.append("")
        if self.saturated_at is None:
            lines.append(
                f"not saturated up to {self.steps[-1].config.rate:g} calls/s" if self.steps else "no step"
            )
        else:
            lines.append(
                f"saturation point: {self.saturated_at:g} calls/s; highest rate within bounds: "
                f"{_fmt(self.sustainable, 1) if self.sustainable is not None else 'none'} calls/s"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        return _markdownish_html(self.text())

    def to_dict(self) -> dict[str, Any]:
        return {
            "p99_bound_ms": self.p99_bound_ms,
            "max_error_rate": self.max_error_rate,
            "min_throughput": self.min_throughput,
            "saturated_at": self.saturated_at,
            "sustainable": self.sustainable,
            "rows": self.rows(),
            "steps": [s.to_dict() for s in self.steps],
        }

    def plot(self, title: str = "Saturation: latency and errors against the offered rate"):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        rows = self.rows()
        rates = [r["rate"] for r in rows]
        fig = make_subplots(rows=1, cols=2, subplot_titles=("latency (ms, log)", "achieved rate and errors"))
        for key, name in (("p50_ms", "p50"), ("p99_ms", "p99"), ("uncorrected_p99_ms", "p99 uncorrected")):
            fig.add_trace(
                go.Scatter(x=rates, y=[r[key] for r in rows], mode="lines+markers", name=name), 1, 1
            )
        fig.add_hline(y=self.p99_bound_ms, line_dash="dot", annotation_text="p99 bound", row=1, col=1)
        fig.add_trace(
            go.Scatter(x=rates, y=[r["achieved"] for r in rows], mode="lines+markers", name="ok/s"), 1, 2
        )
        fig.add_trace(go.Scatter(x=rates, y=rates, mode="lines", name="offered", line={"dash": "dot"}), 1, 2)
        fig.add_trace(go.Bar(x=rates, y=[r["errors"] for r in rows], name="errors", opacity=0.4), 1, 2)
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_xaxes(title_text="offered calls/s")
        fig.update_layout(title=title, height=420)
        return fig


def _within(
    step: LoadResult, p99_bound_ms: float, max_error_rate: float, min_throughput: float = 0.0
) -> bool:
    p99 = step.p99_ms
    return (
        p99 is not None
        and p99 <= p99_bound_ms
        and step.error_rate <= max_error_rate
        and step.achieved_rate >= min_throughput * step.config.rate
    )


def _ramp(start_rate: float, factor: float, max_rate: float) -> Iterable[float]:
    rate = start_rate
    while rate <= max_rate * (1 + 1e-9):
        yield rate
        rate *= factor


async def find_saturation(
    target: Any,
    config: LoadConfig | None = None,
    *,
    rates: Sequence[float] | None = None,
    start_rate: float = 50.0,
    factor: float = 2.0,
    max_rate: float = 5000.0,
    p99_bound_ms: float = 50.0,
    max_error_rate: float = 0.01,
    min_throughput: float = 0.9,
    refine: int = 0,
    confirm: int = 0,
    cooldown: float = 1.0,
    progress: Callable[[dict[str, Any]], None] | str | None = "auto",
    on_step: Callable[[LoadResult], None] | None = None,
) -> SaturationResult:
    """Run steps of increasing rate (``rates``, or ``start_rate`` x ``factor``^n up to ``max_rate``)
    until p99 passes ``p99_bound_ms``, the error rate ``max_error_rate``, or the
    throughput (calls finished within the step) falls below ``min_throughput``
    times the offered rate (a queue that only grows, whatever the latency bound).

    ``refine`` more steps bisect (geometrically) between the last rate within
    the bounds and the first past them.  ``confirm``: a step past a bound is
    run again up to this many times and counts as within them if a re-run is
    (one stall of a shared machine then does not end the search; a saturated
    rate fails every time).  Each step is a full :func:`run_load`
    with ``config`` (its rate replaced), then ``cooldown`` seconds of quiet.
    """
    if factor <= 1 and rates is None:
        raise ValueError("factor must be > 1")
    cfg = config or LoadConfig()
    steps: list[LoadResult] = []
    good: float | None = None
    bad: float | None = None

    async def run(rate: float) -> bool:
        result = await run_load(target, replace(cfg, rate=float(rate)), progress=progress)
        steps.append(result)
        if on_step is not None:
            on_step(result)
        await asyncio.sleep(cooldown)
        return _within(result, p99_bound_ms, max_error_rate, min_throughput)

    async def step(rate: float) -> bool:
        """Within the bounds, or (``confirm`` re-runs) within them on a re-run."""
        if await run(rate):
            return True
        for _ in range(confirm):
            if await run(rate):
                return True
        return False

    for rate in rates if rates is not None else _ramp(start_rate, factor, max_rate):
        if await step(rate):
            good = rate if good is None else max(good, rate)
        else:
            bad = rate
            break
    for _ in range(refine if good is not None and bad is not None else 0):
        mid = round(math.sqrt(good * bad), 1)
        if not good < mid < bad:
            break
        if await step(mid):
            good = mid
        else:
            bad = mid
    steps.sort(key=lambda s: s.config.rate)
    return SaturationResult(steps, p99_bound_ms, max_error_rate, bad, good, min_throughput)


# -------------------------------------------------------------------- plots
def _plot_windows(windows: list[dict[str, Any]], title: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    t = [w["t"] for w in windows]
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, subplot_titles=("latency per window (ms)", "throughput and errors")
    )
    for key, name in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("max_ms", "max")):
        fig.add_trace(go.Scatter(x=t, y=[w[key] for w in windows], mode="lines+markers", name=name), 1, 1)
    fig.add_trace(
        go.Scatter(x=t, y=[w["throughput"] for w in windows], mode="lines", name="completed/s"), 2, 1
    )
    fig.add_trace(go.Bar(x=t, y=[w["errors"] for w in windows], name="errors", opacity=0.5), 2, 1)
    fig.update_xaxes(title_text="seconds since start", row=2, col=1)
    fig.update_layout(title=title, height=520)
    return fig


def decode_histogram(encoded: str) -> HdrHistogram:
    """An HdrHistogram back from :meth:`LoadResult.to_dict` (to merge runs: ``h.add(other)``)."""
    return HdrHistogram.decode(encoded)
