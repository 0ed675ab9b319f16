"""The open-loop load generator (macula_lab.lab.load) and ``macula-lab load``.

Fake targets make the timing properties checkable (a stall of the event loop, a
server of known capacity); a real lab and real node processes check the wiring.
Bounds are generous: this runs on a shared 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest

import macula_lab
from macula_lab.cli import main
from macula_lab.lab.lab import Lab
from macula_lab.lab.load import (
    LoadConfig,
    decode_histogram,
    find_saturation,
    run_closed_loop,
    run_load,
)

from ..conftest import client_args

pytestmark = pytest.mark.timeout(120)


class Fake:
    """A target whose calls take ``delay`` seconds (async), recording what it was asked."""

    def __init__(self, delay: float = 0.001, name: str = "fake"):
        self.delay = delay
        self.name = name
        self.calls: list[tuple] = []

    async def call(self, service, args, *, strategy=None, timeout=5.0, max_attempts=None):
        self.calls.append((service, args, strategy, timeout))
        if service == "bad":
            raise LookupError("no such thing")
        await asyncio.sleep(self.delay)
        return args


class Server(Fake):
    """One call at a time, ``delay`` each: a capacity of 1/delay calls per second."""

    def __init__(self, delay: float):
        super().__init__(delay)
        self.lock = asyncio.Lock()

    async def call(self, service, args, **kw):
        async with self.lock:
            await asyncio.sleep(self.delay)


async def test_open_loop_sends_rate_times_duration_and_reports():
    fake = Fake()
    result = await run_load(fake, LoadConfig(rate=200, duration=1.0, warmup=0.25), progress=None)
    assert result.sent == 200 and result.ok == 200 and result.failed == 0
    assert len(fake.calls) == 250  # the warm-up's calls are sent, not counted
    assert (
        150 <= result.achieved_rate <= 200.5
    )  # finished within the measured second (a stall may delay some)
    assert 0 < result.p50_ms <= result.p99_ms
    assert result.percentile_ms(99, corrected=False) <= result.p99_ms
    assert sum(w["ok"] for w in result.windows) == 250 and result.windows[0]["warmup"]
    text = result.text()
    assert "from intended send (corrected)" in text and "| math.add | 200 | 0 |" in text
    assert "<table>" in result._repr_html_()
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["summary"]["ok"] == 200
    assert decode_histogram(doc["hdr"]["latency"]).get_total_count() == 200


async def test_latency_counts_from_the_intended_send_time():
    """The event loop stalls 0.3 s: calls due meanwhile are sent late, and that wait is counted."""

    class Staller(Fake):
        async def call(self, service, args, **kw):
            self.calls.append(service)
            if len(self.calls) == 100:
                time.sleep(0.3)  # noqa: ASYNC251 - blocks the loop: the generator cannot send
            await asyncio.sleep(0.001)

    result = await run_load(Staller(), LoadConfig(rate=100, duration=2.0), progress=None)
    corrected, uncorrected = result.percentile_ms(99), result.percentile_ms(99, corrected=False)
    assert result.ok == 200
    assert corrected >= 200, result.text()  # ~30 calls waited up to 300 ms behind the stall
    assert corrected > uncorrected + 100, result.text()
    assert result.summary()["send_lag_p99_ms"] >= 150


async def test_closed_loop_does_not_see_the_stall_queue():
    """The same stall in a closed loop: one slow call, the workers simply wait (no queue is seen)."""

    class Staller(Fake):
        async def call(self, service, args, **kw):
            self.calls.append(service)
            if len(self.calls) == 20:
                time.sleep(0.3)  # noqa: ASYNC251 - the stall
            await asyncio.sleep(0.005)

    result = await run_closed_loop(Staller(), LoadConfig(duration=1.0), concurrency=1)
    assert result.concurrency == 1 and result.ok > 20
    assert result.p50_ms < 100 and result.percentile_ms(99) == result.percentile_ms(99, corrected=False)
    assert "closed-loop load: 1 workers" in result.text() and result.summary()["rate"] is None


async def test_poisson_arrivals_mixes_and_per_service_args():
    fake = Fake()
    cfg = LoadConfig(
        rate=400,
        duration=1.0,
        arrival="poisson",
        services={"a.x": 3, "b.y": 1},
        strategies=["random", "round_robin"],
        args={"n": 1},
        service_args={"b.y": {"n": 2}},
        timeout=0.7,
        seed=7,
    )
    result = await run_load(fake, cfg, progress=None)
    assert 300 <= result.sent <= 500  # Poisson: about rate x duration
    services = Counter(c[0] for c in fake.calls)
    assert 2.0 < services["a.x"] / services["b.y"] < 4.5
    assert {c[1]["n"] for c in fake.calls if c[0] == "b.y"} == {2}
    assert {c[1]["n"] for c in fake.calls if c[0] == "a.x"} == {1}
    assert {c[2] for c in fake.calls} == {"random", "round_robin"} and {c[3] for c in fake.calls} == {0.7}
    assert set(result.per_service) == {"a.x", "b.y"} and set(result.per_strategy) == {"random", "round_robin"}


async def test_errors_in_flight_cap_and_unfinished_calls():
    result = await run_load(Fake(), LoadConfig(rate=100, duration=0.5, services="bad"), progress=None)
    assert result.ok == 0 and result.failed == 50 and result.error_rate == 1.0
    assert result.errors == {"LookupError": 50} and "no such thing" in result.first_errors["LookupError"]
    assert result.p99_ms is None and "errors:" in result.text()
    slow = Fake(delay=30.0)
    result = await run_load(
        slow, LoadConfig(rate=100, duration=0.5, max_in_flight=10, drain=0.2), progress=None
    )
    assert result.errors == {"TooManyInFlight": 40, "Unfinished": 10}, result.errors
    assert result.sent == 50 and result.failed == 50


async def test_saturation_search_finds_the_rate_a_server_cannot_keep_up_with():
    # 50 calls/s at most; the rates stay far from it on both sides, so a loaded machine's stalls
    # (which slow the generator too) cannot move the verdicts
    server = Server(delay=0.02)
    steps = []
    sat = await find_saturation(
        server,
        LoadConfig(duration=1.5),
        rates=[10, 20, 320],
        p99_bound_ms=400,  # far above this machine's noise; the queue at 80/s and 320/s passes it
        refine=1,
        cooldown=0.1,
        progress=None,
        on_step=steps.append,
    )
    assert round(sat.saturated_at) in (80, 320) and sat.sustainable in (20, 80), sat.text()
    assert sat.sustainable < sat.saturated_at
    rates = [r["rate"] for r in sat.rows()]
    assert rates == sorted(rates) and rates[:2] == [10, 20] and len(steps) == len(rates)
    verdicts = {r["rate"]: r["within_bounds"] for r in sat.rows()}
    assert verdicts[sat.saturated_at] is False and verdicts[sat.sustainable] is True
    assert sat.steps[-1].p99_ms > 400  # 80/s (the refined step): a queue growing by 30 calls/s for 1.5 s
    text = sat.text()
    assert (
        "| rate /s | achieved ok/s | p50 ms | p99 ms |" in text
        and f"saturation point: {sat.saturated_at:g}" in text
    )
    assert json.loads(json.dumps(sat.to_dict()))["saturated_at"] == sat.saturated_at


async def test_a_queue_that_only_grows_is_saturation_whatever_the_latency_bound():
    sat = await find_saturation(
        Server(delay=0.005),
        LoadConfig(duration=2.0),
        rates=[100, 400],
        p99_bound_ms=1e6,
        min_throughput=0.75,
        cooldown=0,
        progress=None,
    )
    assert sat.saturated_at == 400 and sat.sustainable == 100, sat.text()
    [_, over] = sat.steps
    assert over.error_rate == 0 and over.achieved_rate < 0.75 * 400  # every call answered, too late


async def test_a_step_past_a_bound_can_be_confirmed_by_a_rerun():
    class Flaky(Fake):  # one stall, in the first step at 200/s only
        async def call(self, service, args, **kw):
            self.calls.append(service)
            if len(self.calls) == 100:  # 50 at 100/s, then the 50th call of the first 200/s step
                await asyncio.sleep(0)
                time.sleep(1.5)  # noqa: ASYNC251 - the stall: far past the bound, whatever the load
            await asyncio.sleep(0.001)

    sat = await find_saturation(
        Flaky(),
        LoadConfig(duration=0.5),
        rates=[100, 200],
        p99_bound_ms=800,  # a loaded machine's own stalls stay under it; the planted one does not
        confirm=1,
        cooldown=0,
        progress=None,
    )
    assert sat.saturated_at is None and sat.sustainable == 200, sat.text()
    assert [(r["rate"], r["within_bounds"], r["rerun"]) for r in sat.rows()] == [
        (100, True, False),
        (200, False, False),
        (200, True, True),
    ]
    assert "NO |" in sat.text() and "yes (re-run) |" in sat.text()


def test_config_is_checked():
    for bad in (
        {"rate": 0},
        {"duration": -1},
        {"arrival": "bursty"},
        {"services": {}},
        {"services": {"a": -1}},
        {"window": 0},
    ):
        with pytest.raises(ValueError):
            LoadConfig(**bad).validate()


async def test_against_a_lab_with_strategies_and_callers():
    lab = await Lab.start(3, sample_interval=None)
    try:
        for provider in ("node-1", "node-3"):
            await lab.node(provider).advertise("math.add", "calculator", ttl=60)
        await lab.node("node-2").call("math.add", {"a": 1, "b": 2})
        cfg = LoadConfig(rate=100, duration=1.0, callers=["node-2"], strategies=["random", "round_robin"])
        lines = []
        result = await run_load(lab, cfg, progress=lines.append)
        assert result.ok == 100 and result.failed == 0, result.text()
        assert "calling from node-2" in result.target
        assert set(result.per_strategy) == {"random", "round_robin"}
        assert lines and lines[-1]["final"] and lines[-1]["ok"] == 100
        with pytest.raises(TypeError):
            await run_load(object(), cfg, progress=None)
    finally:
        await lab.stop()


def test_cli_load_in_process_and_saturation(tmp_path, capsys):
    out = tmp_path / "load.json"
    args = ["load", "--transport", "memory", "--rate", "50", "--duration", "1", "--warmup", "0"]
    assert main([*args, "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "open-loop load: 50 calls/s" in printed and "calling from node-2" in printed
    doc = json.loads(out.read_text())
    assert doc["summary"]["ok"] == 50 and doc["summary"]["errors"] == 0
    sat = [
        "--saturate",
        "--rates",
        "20,40",
        "--refine",
        "0",
        "--p99-bound",
        "1000",
        "--min-throughput",
        "0.5",
    ]
    assert main([*args, *sat]) == 0
    captured = capsys.readouterr()
    assert "not saturated up to 40 calls/s" in captured.out
    assert "rate 40/s" in captured.err  # the progress lines
    assert main(["load", "--attach", "quic://127.0.0.1:1"]) == 2  # no --ca


async def test_cli_load_attached_to_node_processes(node_processes, certs, tmp_path):
    procs = await node_processes("com.test.load")
    client = await macula_lab.connect(procs[0].endpoint, realm="com.test.load", **client_args(certs))
    try:
        await client.advertise("load.echo", lambda args: args, ttl=60)  # node-1 provides it
        out = tmp_path / "attached.json"
        c = certs["client2"]
        argv = ["load", "--attach", procs[1].endpoint, "--realm", "com.test.load"]
        argv += ["--ca", str(c.ca), "--cert", str(c.cert), "--key", str(c.key)]
        argv += ["--service", "load.echo", "--rate", "40", "--duration", "1", "--warmup", "0.2"]
        argv += ["--json", str(out), "--quiet"]
        assert await asyncio.to_thread(main, argv) == 0
        doc = json.loads(out.read_text())
        assert doc["summary"]["ok"] == 40 and doc["summary"]["errors"] == 0, doc["errors"]
        assert doc["target"].startswith("attached lab, calling from node-2")
    finally:
        await client.close()
