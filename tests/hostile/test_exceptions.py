"""An exception caused by one contact is that contact's failure, never the end of a lookup or a loop.

Exceptions of unexpected types (what a bug or a hostile reply could raise) are
injected where a node talks to one contact; the work goes on, the failure is
counted, and the contact is treated as failed.
"""

from __future__ import annotations

import pytest

from macula_lab import Lab

from ..widgets.test_base import until

REALM = "com.test.exceptions"
ERRORS = [UnicodeError("label too long"), RuntimeError("boom"), KeyError("id")]


@pytest.fixture
async def lab():
    lab = await Lab.start(6, transport="memory", realm=REALM, sample_interval=None)
    yield lab
    await lab.stop()


def break_requests_to(node, endpoint: str, exc: BaseException) -> list:
    """Make every request ``node`` sends to ``endpoint`` raise ``exc``; returns the log of attempts."""
    host, attempts = node.host, []
    real_request, real_send = host.request, host.send_request

    async def request(ep, *args, **kw):
        if ep == endpoint:
            attempts.append(ep)
            raise exc
        return await real_request(ep, *args, **kw)

    def send_request(ep, *args, **kw):
        if ep == endpoint:
            attempts.append(ep)
            raise exc
        return real_send(ep, *args, **kw)

    host.request, host.send_request = request, send_request
    return attempts


@pytest.mark.parametrize("exc", ERRORS, ids=lambda e: type(e).__name__)
async def test_lookups_treat_an_exception_from_one_contact_as_its_failure(lab, exc):
    asker = lab.node("node-1").node
    victim = next(c for c in asker.dht.table.contacts())
    attempts = break_requests_to(asker, victim.endpoint, exc)
    for _ in range(3):
        result = await asker.dht.lookup(victim.node_id, patient=True)
        assert result.closest  # the lookup finished with the others' answers
    assert attempts and asker.dht.counters["contact_errors"] >= len(attempts) > 0
    assert victim.node_id not in asker.dht.table  # failed contacts leave the table


@pytest.mark.parametrize("exc", ERRORS, ids=lambda e: type(e).__name__)
async def test_a_call_fails_over_from_a_provider_that_raises(lab, exc):
    a, b = lab.node("node-2"), lab.node("node-3")
    await a.advertise("svc.two", lambda args: "from node-2")
    await b.advertise("svc.two", lambda args: "from node-3")
    caller = lab.node("node-4")
    break_requests_to(caller.node, a.endpoint, exc)
    failed_over = []
    for _ in range(4):  # round robin: the broken provider's turn comes within two calls
        res = await caller.call("svc.two", {}, strategy="round_robin")
        assert res.value == "from node-3"
        if len(res.attempts) == 2:
            assert type(exc).__name__ in res.attempts[0].error
            failed_over.append(res)
    assert failed_over, "the raising provider was never tried"


async def test_re_advertisement_survives_an_unexpected_exception(lab):
    node = lab.node("node-2").node
    await node.advertise("svc.loop", lambda args: "ok", ttl=1.0)  # re-advertised every 0.8 s
    services, real_store, failures = node.services, node.services.directory.store, []

    async def store_once_broken(key, entry):
        if not failures:
            failures.append(1)
            raise RuntimeError("injected")
        return await real_store(key, entry)

    services.directory.store = store_once_broken
    await until(lambda: services.ads["svc.loop"].timer.count >= 3, timeout=15, what="three re-advertisements")
    ad = services.ads["svc.loop"]
    assert ad.timer.count >= 3 and ad.failures == 1 and services.live_timers() == ["svc.loop"]
    assert await lab.node("node-5").call("svc.loop", {}) is not None


async def test_handover_to_a_newcomer_that_raises_does_not_stop_the_node(lab):
    holder = lab.node("node-1").node
    # sixteen keys: node-1 is among the three closest holders of some (handover comes from those)
    for i in range(16):
        await holder.advertise(f"svc.hand{i}", lambda args: "ok")
    before = holder.dht.counters["contact_errors"]
    # broken before the newcomer joins (memory endpoints are mem://NAME): its handover raises
    attempts = break_requests_to(holder, "mem://node-7", RuntimeError("injected"))
    newcomer = await lab.add_node("node-7")
    # the newcomer's join need not reach node-1: a request from it makes node-1 meet it for sure
    await newcomer.node.ping(holder.endpoint)
    await until(lambda: attempts, timeout=10, what="a handover to the broken newcomer")
    await lab.add_node("node-8")  # more handovers, to healthy contacts
    assert holder.running and all(not t.done() or not t.exception() for t in holder.tasks)
    assert holder.dht.counters["contact_errors"] > before  # counted as that contact's failure
    assert (await lab.node("node-8").call("svc.hand0", {})).value == "ok"


async def test_sampling_goes_on_when_inspecting_one_node_raises(lab):
    broken = lab.node("node-3")
    real = broken.inspect
    calls = []

    async def inspect(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("injected")
        return await real(*args, **kw)

    broken.inspect = inspect
    await lab.sample()
    assert any("node-3" in e["where"] and "ZeroDivisionError" in e["error"] for e in lab.errors)
    snaps = await lab.sample()
    assert "node-3" in snaps and len(snaps) == 6
