"""TTL watch: live rows for advertisements (with re-advertisement timers) and stored records."""

from __future__ import annotations

import asyncio

import pytest

from macula_lab import Lab
from macula_lab.widgets import TTLWatch

from ..timing import eventually
from .test_base import REALM, lab_fixture, until  # noqa: F401  (the lab fixture)


async def test_rows_for_advertisements_and_records(lab):
    watch = TTLWatch(lab)
    try:
        assert "no advertisements" in watch.ads_view.value
        await lab.node("node-1").advertise("svc.ttl", "echo", ttl=30)
        await until(lambda: watch.advertisement_rows() and watch.record_rows(), what="rows")
        [ad] = watch.advertisement_rows()
        assert ad["node"] == "node-1" and ad["service"] == "svc.ttl" and ad["ttl"] == 30
        assert (
            ad["interval"] == pytest.approx(24.0)
            and 22 < ad["next_fire_in"] <= 24
            and 28 < ad["expires_in"] <= 30
        )
        assert ad["count"] == 0 and ad["lateness_ms"] is None
        records = watch.record_rows()
        assert {r["holder"] for r in records} == {
            "node-1",
            "node-2",
            "node-3",
        }  # k >= 3: every node stores it
        assert all(
            r["service"] == "svc.ttl" and r["provider"] == "node-1" and 28 < r["remaining"] <= 30
            for r in records
        )
        html = watch.ads_view.value
        assert "svc.ttl" in html and "next re-advertisement" in html and "class='macula-bar'" in html
        assert watch.records_view.value.count("<tr") == 1 + 3
        await lab.node("node-1").unadvertise("svc.ttl")
        await until(lambda: not watch.advertisement_rows() and not watch.record_rows(), what="rows gone")
        assert "no stored records" in watch.records_view.value
    finally:
        watch.close()


async def test_countdown_ticks_between_samples():
    lab = await Lab.start(2, realm=REALM, sample_interval=None)  # no sampler: only the local ticker moves
    watch = TTLWatch(lab, tick=0.05)
    try:
        await lab.node("node-2").advertise("svc.tick", "whoami", ttl=20)
        await lab.sample()
        [before] = watch.advertisement_rows()
        html = watch.ads_view.value
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(0.4)
        [after] = watch.advertisement_rows()
        elapsed = loop.time() - t0
        # the countdown follows the clock between samples (however long the sleep really took)
        assert before["expires_in"] - after["expires_in"] == pytest.approx(elapsed, abs=0.15)
        await eventually(lambda: watch.ads_view.value != html, 5, "a redraw by the ticker")
    finally:
        watch.close()
        await lab.stop()
    assert watch._ticker.cancelled() or watch._ticker.done()


async def test_readvertisements_are_counted_with_their_lateness(lab):
    watch = TTLWatch(lab, tick=None)
    try:
        await lab.node("node-3").advertise("svc.short", "whoami", ttl=1.0)  # re-advertised every 0.8 s
        await until(
            lambda: any(r["count"] >= 1 for r in watch.advertisement_rows()),
            timeout=5,
            what="a re-advertisement",
        )
        [ad] = watch.advertisement_rows()
        assert ad["lateness_ms"] is not None and ad["lateness_ms"] < 500
        assert " ms</td>" in watch.ads_view.value
    finally:
        watch.close()
