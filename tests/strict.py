"""``MACULA_STRICT=1`` (set by ``.ci/run``): a test that would skip fails instead, with the reason.

CI must run every test: a missing ``ip``, chromium, kubectl or validator
turns into a red run, not into an ``s`` nobody reads.  Without the switch
(developers' machines) such tests still skip, with their reason shown (``-rs``).
"""

from __future__ import annotations

import os

import pytest

STRICT_ENV = "MACULA_STRICT"


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def skip_or_fail(reason: str) -> None:
    """Skip with ``reason``, or fail with it under ``MACULA_STRICT=1``."""
    if strict():
        pytest.fail(f"{reason} ({STRICT_ENV}=1: CI must run this test, not skip it)", pytrace=False)
    pytest.skip(reason)


def _reason(longrepr) -> str:
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def fail_skipped(report) -> None:
    """Turn a skipped test or collection report into a failure (strict mode only)."""
    if strict() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under {STRICT_ENV}=1 (CI must run every test): {_reason(report.longrepr)}"
