"""Selection strategies and failover under a killed provider."""

from __future__ import annotations

import asyncio
import re

import pytest

from macula_lab.lab import Lab
from macula_lab.procedures.experiments import (
    compare_strategies,
    failover_under_kill,
    plot_failover,
    plot_selection,
)
from macula_lab.procedures.faults import delay_readvertising
from macula_lab.procedures.local import start_local_lab
from macula_lab.procedures.readvertisement import late_and_lapsed, readvertisement_kept

pytestmark = pytest.mark.slow


async def test_strategies_and_failover():
    lab = await start_local_lab(4, realm="com.test.failover", sample_interval=None)
    providers = ["node-1", "node-3", "node-4"]
    try:
        for p in providers:
            await lab.node(p).advertise("test.calculator", "calculator", ttl=1.5)
        rows, selection = await compare_strategies(lab, "test.calculator", "node-2", providers, calls=12)
        assert selection.passed, selection.text()
        assert len(rows) == 12 * 5
        first = {r["provider"] for r in rows if r["strategy"] == "first"}
        assert first == {"node-1"}  # the lowest node id
        frows, failover = await failover_under_kill(
            lab, "test.calculator", "node-2", "node-3", ["node-1", "node-4"], ttl=1.5, calls=10, kill_after=3
        )
        assert failover.passed, failover.text()
        assert any("node-3" in r["failed"] for r in frows)
    finally:
        await lab.stop()
    assert len(plot_selection(rows).data) > 0
    assert len(plot_failover(frows, "node-3").data) > 0


async def _wait_fires(lab, node: str, service: str, count: int, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        snap = await lab.node(node).inspect(["advertisements"])
        row = next((a for a in snap["advertisements"] if a["service"] == service), None)
        if row and row["count"] >= count:
            return
        assert loop.time() < end, f"{node} fired {row and row['count']} time(s) in {timeout}s"
        await asyncio.sleep(0.1)


async def test_late_readvertisement_fails_the_ttl_box():
    """05 said PASSED while a provider's record lapsed: lateness and lapses fail the box now."""
    lab = await Lab.start(3, realm="com.test.late", transport="memory", sample_interval=None)
    try:
        for p in ("node-1", "node-3"):
            await lab.node(p).advertise("svc.late", "whoami", ttl=2.0)
        delay_readvertising(lab, "node-3", "svc.late", 2.0)  # interval 1.6 s + 2 s > the 2 s TTL
        for p in ("node-1", "node-3"):
            await _wait_fires(lab, p, "svc.late", 1)
        check = await readvertisement_kept(lab, "svc.late", ["node-1", "node-3"])
        assert not check.passed and check.group == "Service Advertisement", check
        assert re.search(r"node-3 fired \d+ ms late", check.evidence), check.evidence
        assert re.search(r"node-3's record lapsed \d+ ms before", check.evidence), check.evidence
        assert check.measured < 0  # the margin before expiry went negative
        on_time = await readvertisement_kept(lab, "svc.late", ["node-1"])
        assert on_time.passed and on_time.measured > 0, on_time
    finally:
        await lab.stop()


def test_late_and_lapsed_from_timer_rows():
    row = {"ttl": 2.0, "interval": 1.6, "lateness_max": 0.1}
    assert late_and_lapsed({"a": row, "b": None}, 0.25) == ({}, {})
    late, lapsed = late_and_lapsed({"a": {**row, "lateness_max": 0.5}}, 0.25)
    assert late == {"a": 0.5} and lapsed == pytest.approx({"a": 0.1})
