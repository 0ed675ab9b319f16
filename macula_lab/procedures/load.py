"""The load procedure's checks (``notebooks/08_load.ipynb``): what an open-loop run and a saturation search showed."""

from __future__ import annotations

from typing import Any

from ..lab.load import LoadResult, SaturationResult
from .report import Check, Report

GROUP = "Load testing"


def load_report(
    run: LoadResult,
    saturation: SaturationResult | None = None,
    closed: LoadResult | None = None,
    *,
    max_error_rate: float = 0.01,
    name: str = "08_load",
    parameters: dict[str, Any] | None = None,
) -> Report:
    """Checks of one open-loop run (and a saturation search, a closed-loop run), with the figures as metrics."""
    cfg = run.config
    report = Report(name, parameters=parameters or {}, started_at=run.started_at)
    expected = cfg.rate * cfg.duration
    report.add(
        Check(
            GROUP,
            "Open loop: calls sent at the target rate, answered or not",
            abs(run.sent - expected) <= max(2.0, 0.01 * expected),
            run.sent,
            "calls",
            f"{cfg.rate:g}/s x {cfg.duration:g} s = {expected:g} intended ({cfg.arrival} arrivals)",
        )
    )
    report.add(
        Check(
            GROUP,
            f"Error rate at {cfg.rate:g} calls/s within {max_error_rate:.1%}",
            run.ok > 0 and run.error_rate <= max_error_rate,
            run.error_rate * 100,
            "%",
            ", ".join(f"{n} x {e}" for e, n in run.errors.items()) or "no error",
        )
    )
    corrected, uncorrected = run.percentile_ms(99), run.percentile_ms(99, corrected=False)
    report.add(
        Check(
            GROUP,
            "Latency from the intended send time (coordinated omission corrected)",
            corrected is not None and uncorrected is not None and corrected >= uncorrected,
            corrected,
            "ms p99",
            f"uncorrected (from the actual send) p99 {uncorrected} ms; generator send lag p99 "
            f"{run.summary()['send_lag_p99_ms']} ms",
        )
    )
    windows = [w for w in run.windows if not w["warmup"]]
    report.add(
        Check(
            GROUP,
            "Latency percentiles and errors recorded over time",
            len(windows) >= int(cfg.duration / cfg.window),
            len(windows),
            "windows",
            f"{cfg.window:g} s windows, HDR histograms",
        )
    )
    report.metrics["load_run"] = run.summary()
    report.metrics["load_windows"] = run.windows
    if saturation is not None:
        rates = [s.config.rate for s in saturation.steps]
        # a verdict either way: the first rate past a bound, or every step within them
        found = saturation.saturated_at is not None and (
            saturation.sustainable is None or saturation.sustainable < saturation.saturated_at
        )
        report.add(
            Check(
                GROUP,
                "Saturation search: steps of rising rate until p99 or errors pass their bound",
                bool(rates) and (found or saturation.saturated_at is None),
                saturation.saturated_at
                if saturation.saturated_at is not None
                else f"not reached up to {max(rates):g}",
                "calls/s" if saturation.saturated_at is not None else "",
                f"p99 bound {saturation.p99_bound_ms:g} ms, errors {saturation.max_error_rate:.1%}; "
                f"highest rate within bounds {saturation.sustainable}",
            )
        )
        report.metrics["saturation"] = saturation.rows()
        report.metrics["saturated_at"] = saturation.saturated_at
        report.metrics["sustainable_rate"] = saturation.sustainable
    if closed is not None:
        report.metrics["closed_loop"] = closed.summary()
    return report
