"""diagnose: the testing guide's Troubleshooting cases, as pure rules and against real labs."""

from __future__ import annotations

import asyncio
import time

import pytest

from macula_lab.lab import Lab
from macula_lab.procedures.diagnose import CASES, classify, diagnose
from macula_lab.procedures.faults import stop_readvertising


def node(realm="r", contacts=("a", "b", "c"), ads=(), records=(), events=(), ready=True):
    return {
        "realm": realm,
        "ready": ready,
        "contacts": list(contacts),
        "advertisements": list(ads),
        "records": list(records),
        "events": list(events),
    }


def facts(nodes, service=None, found=(), **kw):
    d = {"realm": "r", "nodes": nodes, "unreachable": [], "realm_mismatch": [], "now": 100.0, **kw}
    if service:
        d.update(service=service, found=list(found), consumer="b")
    return d


def applies(findings):
    return [f.case for f in findings if f.applies]


def test_healthy_mesh():
    nodes = {n: node(contacts=[m for m in "abc" if m != n]) for n in "abc"}
    findings = classify(facts(nodes))
    assert [f.case for f in findings] == list(CASES[:3]) and not applies(findings)


def test_wrong_realm_and_unreachable_and_no_dht():
    nodes = {"a": node(contacts=["b"]), "b": node(realm="other", contacts=["a"]), "c": node(contacts=[])}
    got = applies(classify(facts(nodes, unreachable=["quic://x:1: no QUIC handshake"])))
    assert got == ["Wrong realm", "Nodes unreachable over UDP", "DHT not available"]


def test_service_cases():
    rec = {"metadata": {"service": "s", "node": "a"}, "remaining": 1.0}
    ad = {"service": "s", "expires_in": 2.0, "count": 1, "next_fire_in": 1.0, "ttl": 3.0}
    published = {"kind": "published", "service": "s", "at": 99.0, "node": "a", "detail": {}}
    nodes = {n: node(contacts=[m for m in "abc" if m != n]) for n in "abc"}

    never = classify(facts(nodes, "s"))
    assert applies(never) == ["Service never advertised"]

    nodes["a"] = node(contacts=["b", "c"], ads=[ad], records=[rec], events=[published])
    assert applies(classify(facts(nodes, "s", found=["a"]))) == []
    assert applies(classify(facts(nodes, "s", found=[]))) == ["Service not yet propagated"]

    lapsed = {**ad, "expires_in": 0.0, "count": 0, "next_fire_in": 0.0}
    nodes["a"] = node(contacts=["b", "c"], ads=[lapsed], events=[published])
    assert applies(classify(facts(nodes, "s"))) == ["No providers: TTL lapsed"]

    nodes["a"] = node(contacts=["b", "c"], events=[published])  # gone without unadvertising
    assert applies(classify(facts(nodes, "s"))) == ["No providers: TTL lapsed"]

    unadv = {**published, "kind": "unadvertised", "at": 99.5}
    nodes["a"] = node(contacts=["b", "c"], events=[published, unadv])
    assert applies(classify(facts(nodes, "s"))) == []


@pytest.fixture
async def lab():
    lab = await Lab.start(n=3, realm="com.test.diagnose", sample_interval=None)
    yield lab
    await lab.stop()


async def test_typo_and_lapsed_ttl_in_a_real_lab(lab):
    await lab.node("node-1").advertise("test.calculator", "calculator", ttl=1.0)  # the shortest TTL allowed
    typo = await diagnose(lab, "test.calculater")
    assert typo.verdict == "Service never advertised"
    assert "test.calculator" in typo.applicable[0].evidence  # the close name it knows
    ok = await diagnose(lab, "test.calculator")
    assert ok.healthy, ok.text()
    stop_readvertising(lab, "node-1", "test.calculator")
    await asyncio.sleep(1.0)  # the record's whole TTL: no earlier verdict can be "lapsed"
    for _ in range(50):  # then poll: expiry sweeps may lag on a loaded machine
        lapsed = await diagnose(lab, "test.calculator")
        if lapsed.verdict == "No providers: TTL lapsed":
            break
        await asyncio.sleep(0.1)
    assert lapsed.verdict == "No providers: TTL lapsed", lapsed.text()
    assert "timer is not firing" in lapsed.applicable[0].evidence
    assert "what to do" in lapsed.text() and "<table>" in lapsed._repr_html_()


async def test_probing_endpoints_wrong_realm_and_unreachable(lab):
    other = await Lab.start(n=1, realm="com.test.elsewhere", certs=lab.certs_dir, sample_interval=None)
    try:
        t0 = time.monotonic()
        d = await diagnose(
            lab,
            endpoints=[other.nodes[0].endpoint, "quic://127.0.0.1:9"],
            ca=f"{lab.certs_dir}/ca.pem",
            timeout=0.5,
        )
    finally:
        await other.stop()
    assert applies(d.findings) == ["Wrong realm", "Nodes unreachable over UDP"], d.text()
    assert "com.test.elsewhere" in d.findings[0].evidence
    assert time.monotonic() - t0 < 5
