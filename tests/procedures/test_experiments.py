"""Selection strategies and failover under a killed provider."""

from __future__ import annotations

import pytest

from macula_lab.procedures.experiments import (
    compare_strategies,
    failover_under_kill,
    plot_failover,
    plot_selection,
)
from macula_lab.procedures.local import start_local_lab

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
