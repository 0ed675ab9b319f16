"""Call panel: results, providers and latency from real calls; bad JSON and engine errors shown."""

from __future__ import annotations

import pytest

from macula_lab.widgets import CallPanel
from macula_lab.widgets.call import DEFAULT_STRATEGY

from .test_base import lab_fixture, until  # noqa: F401  (the lab fixture)


@pytest.fixture
def panel(lab):
    panel = CallPanel(lab)
    yield panel
    panel.close()


async def test_call_shows_result_provider_and_latency(lab, panel):
    await lab.node("node-1").advertise("test.calculator", "calculator", ttl=30)
    assert panel.node.value == "node-2" and panel.strategy.value == DEFAULT_STRATEGY
    panel.service.value = "test.calculator"
    panel.args.value = '{"operation": "mul", "a": 6, "b": 7}'
    panel.call_button.click()
    res = await panel.last_task
    assert res.value == {"result": 42, "node": "node-1"} and res.provider == "node-1"
    assert panel.result is res and panel.last_error is None
    assert panel.status_text.startswith("test.calculator answered by node-1 in ")
    out = panel.output.value
    assert "&quot;result&quot;: 42" in out and "macula-call-provider'>node-1<" in out and " ms</b>" in out
    assert [h["provider"] for h in panel.history] == [
        "node-1"
    ] and "macula-call-history" in panel.history_view.value
    assert panel.history[-1]["how"] == "looked up in the DHT"
    panel.call_button.click()
    assert (await panel.last_task).cache_hit and panel.history[-1]["how"] == "cache hit"
    assert "cache hit" in panel.history_view.value
    # the engine saw the call: node-2's provider statistics count it
    await lab.sample()
    [row] = lab.snapshots["node-2"]["providers"]
    assert row["provider"] == "node-1" and row["selected"] == 2


async def test_bad_json_never_reaches_the_engine(lab, panel):
    panel.service.value = "test.calculator"
    panel.args.value = '{"a": 1,'
    assert "args are not valid JSON" in panel.args_check.value  # checked while typing
    panel.call_button.click()
    assert panel.last_task is None and panel.result is None
    assert panel.status_text.startswith("call: ValueError: args are not valid JSON")
    assert lab.node("node-2").node.services.ok_calls == 0
    await lab.sample()
    assert lab.snapshots["node-2"]["events"] == []  # no discovery, no call
    panel.args.value = '{"a": 1}'
    assert panel.args_check.value == ""
    panel.args.value = ""  # empty means no args
    assert panel.parse_args() is None


async def test_unknown_service_shows_service_not_found(lab, panel):
    panel.service.value, panel.args.value = "nobody.serves.this", "{}"
    panel.call_button.click()
    assert await panel.last_task is None
    assert "ServiceNotFound" in panel.status_text and panel.result is None
    assert "macula-call-error" in panel.output.value and "<b>ServiceNotFound</b>" in panel.output.value
    assert panel.history[-1] == {
        "service": "nobody.serves.this",
        "node": "node-2",
        "ok": False,
        "provider": None,
        "latency_ms": None,
        "text": "ServiceNotFound",
        "how": "",
    }
    assert not lab.errors  # the call's error stays with the call


async def test_handler_errors_come_back_by_name(lab, panel):
    await lab.node("node-3").advertise("svc.fail", "fail", ttl=30)
    panel.service.value = "svc.fail"
    panel.call_button.click()
    await panel.last_task
    assert "RemoteError" in panel.output.value and "always fails" in panel.output.value


async def test_strategy_and_service_suggestions(lab, panel):
    for name in ("node-1", "node-3"):
        await lab.node(name).advertise("svc.pair", "whoami", ttl=30)
    await until(lambda: "svc.pair" in panel.service.options, what="the service among the suggestions")
    panel.service.value, panel.args.value, panel.strategy.value = "svc.pair", "", "round_robin"
    providers = set()
    for _ in range(4):
        panel.call_button.click()
        providers.add((await panel.last_task).provider)
    assert providers == {"node-1", "node-3"} and len(panel.history) == 4
