"""The checklist against a lab in this process: all boxes pass; a provider that never re-advertises fails it."""

from __future__ import annotations

import pytest

from macula_lab.lab import Lab
from macula_lab.procedures import ChecklistConfig, run_checklist
from macula_lab.procedures.checklist import BOXES
from macula_lab.procedures.context import ChecklistError, Context
from macula_lab.procedures.faults import FaultNotPossible, stop_readvertising

pytestmark = pytest.mark.slow
GUIDE_BOXES = {title for boxes in BOXES.values() for _, title in boxes}


@pytest.fixture
async def lab():
    lab = await Lab.start(n=3, realm="com.test.checklist", cache_ttl=0.5, sample_interval=0.5)
    yield lab
    await lab.stop()


async def test_every_box_passes(lab):
    # a 3 s TTL with gaps judged within 0.45 x its 2.4 s interval: a loaded machine passes too
    report = await run_checklist(lab, ttl=3.0, cache_ttl=0.5, tolerance=0.45, progress=False)
    assert report.passed, report.text()
    assert {c.title for c in report.checks} == GUIDE_BOXES  # every box of the guide, once
    assert len(report.checks) == 19
    by_title = {c.title: c for c in report.checks}
    assert by_title["Re-advertisement timer scheduled"].measured == pytest.approx(2.4)
    assert by_title["Discovery result cached (60s TTL)"].measured == pytest.approx(0.5, abs=0.01)
    assert by_title["Timer fires at correct interval"].measured == pytest.approx(2.4, abs=1.08)
    assert (
        report.parameters["providers"] == ["node-1", "node-3"] and report.parameters["consumer"] == "node-2"
    )
    assert report.diagnosis is None  # only on failure
    assert not lab.errors


async def test_provider_that_never_readvertises_fails(lab):
    report = await run_checklist(lab, ttl=1.0, progress=False, faults={"node-3": "no_readvertise"})
    assert not report.passed
    failed = {c.title for c in report.failed}
    assert {
        "Timer fires at correct interval",
        "Service re-published to DHT",
        "Continues indefinitely until unadvertise",
        "Re-advertisement happens before TTL expiry",
    } <= failed
    assert "Service published to DHT successfully" not in failed  # the fault comes after publishing
    assert report.diagnosis["verdict"] == "No providers: TTL lapsed"
    assert any("node-3" in n for n in report.notes)


async def test_service_already_provided_is_refused(lab):
    await lab.node("node-2").advertise("test.calculator", "calculator", ttl=10)
    report = await run_checklist(lab, ChecklistConfig(ttl=1.0, confirm_cancel=False), progress=False)
    first = next(c for c in report.checks if c.title == "Service published to DHT successfully")
    assert not first.passed and "already provided" in first.evidence
    assert len(report.checks) == 1 + 16 and all(c.status == "NOT RUN" for c in report.checks[1:])


async def test_roles_and_limits(lab):
    ctx = Context(lab, ChecklistConfig(providers=["node-2"], consumer="node-1"))
    assert ctx.providers == ["node-2"] and ctx.consumer == "node-1"
    with pytest.raises(KeyError):
        Context(lab, ChecklistConfig(consumer="node-9"))
    with pytest.raises(FaultNotPossible):
        stop_readvertising(lab, "node-1", "not.advertised")


async def test_needs_two_nodes():
    lab = await Lab.start(n=1, transport="memory", sample_interval=None)
    try:
        with pytest.raises(ChecklistError, match="at least 2"):
            await run_checklist(lab, progress=False)
    finally:
        await lab.stop()


async def test_provider_that_readvertises_late_fails(lab):
    report = await run_checklist(lab, ttl=1.0, progress=False, faults={"node-3": "late_readvertise"})
    by_title = {c.title: c for c in report.checks}
    timer, expiry = by_title["Timer fires at correct interval"], by_title["Re-advertisement happens before TTL expiry"]
    assert not timer.passed and "node-3 fired" in timer.evidence, timer
    assert not expiry.passed and "node-3's record lapsed" in expiry.evidence, expiry
