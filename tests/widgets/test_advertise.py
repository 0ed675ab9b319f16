"""Advertise panel: clicks publish into the real DHT and withdraw from it; errors are shown."""

from __future__ import annotations

import pytest

from macula_lab.runtime.handlers import BUILTINS
from macula_lab.runtime.services import ServiceNotFound
from macula_lab.widgets import AdvertisePanel

from .test_base import lab_fixture, until  # noqa: F401  (the lab fixture)


@pytest.fixture
def panel(lab):
    panel = AdvertisePanel(lab)
    yield panel
    panel.close()


async def test_advertise_a_builtin_then_unadvertise(lab, panel):
    assert list(panel.node.options) == lab.names and list(panel.handler.options) == list(BUILTINS)
    panel.node.value, panel.service.value, panel.ttl.value, panel.handler.value = (
        "node-1",
        "svc.who",
        30,
        "whoami",
    )
    panel.advertise_button.click()
    assert await panel.last_task >= 1
    assert panel.status_text == "advertised svc.who from node-1 with whoami (TTL 30 s, 3 replicas)"
    # the engine: discoverable from another node, and the built-in was made for node-1
    [provider] = await lab.node("node-3").discover("svc.who", refresh=True)
    assert provider.metadata.get("node") == "node-1" and provider.ttl == 30
    assert (await lab.node("node-3").call("svc.who")).value == {"node": "node-1"}

    panel.unadvertise_button.click()
    assert await panel.last_task >= 1
    assert panel.status_text.startswith("unadvertised svc.who from node-1 (")
    assert await lab.node("node-2").discover("svc.who", refresh=True) == []
    with pytest.raises(ServiceNotFound):
        await lab.node("node-2").call("svc.who")


async def test_advertise_any_python_callable(lab):
    seen = []

    async def square(args):
        seen.append(args)
        return {"square": args["x"] ** 2}

    panel = AdvertisePanel(lab, handlers={"square": square})
    try:
        assert "square" in panel.handler.options
        panel.add_handler("double", lambda a: 2 * a)
        panel.node.value, panel.service.value, panel.handler.value = "node-2", "math.square", "square"
        panel.metadata.value = '{"zone": "a"}'
        panel.advertise_button.click()
        await panel.last_task
        res = await lab.node("node-1").call("math.square", {"x": 7})
        assert res.value == {"square": 49} and res.provider == "node-2" and seen == [{"x": 7}]
        [p] = await lab.node("node-3").discover("math.square", refresh=True)
        assert p.metadata["zone"] == "a"
        with pytest.raises(ValueError, match="built-in"):
            panel.add_handler("echo", print)
        with pytest.raises(TypeError):
            panel.add_handler("nope", 42)
    finally:
        panel.close()


async def test_bad_input_is_refused_before_the_engine(lab, panel):
    panel.service.value = "  "
    panel.advertise_button.click()
    assert panel.last_task is None and "enter a service name" in panel.status_text
    panel.service.value, panel.metadata.value = "svc.meta", "[1, 2"
    panel.advertise_button.click()
    assert panel.last_task is None and "bad metadata" in panel.status_text
    panel.metadata.value = "[1, 2]"
    panel.advertise_button.click()
    assert panel.last_task is None and "must be a JSON object" in panel.status_text
    assert await lab.node("node-2").discover("svc.meta", refresh=True) == []


async def test_engine_errors_are_shown_in_the_panel(lab, panel):
    panel.node.value, panel.service.value, panel.ttl.value = "node-3", "svc.down", -5.0
    panel.advertise_button.click()
    assert await panel.last_task is None
    assert panel.status_text.startswith("advertise svc.down on node-3 failed: InvalidField: "), panel.status_text
    assert not lab.errors  # the user's action failed where they asked: not a background error


async def test_a_stopped_node_is_not_offered(lab, panel):
    await lab.stop_node("node-3")
    await lab.sample()
    assert list(panel.node.options) == ["node-1", "node-2"]


async def test_node_choices_follow_the_lab(lab, panel):
    await lab.add_node("edge")
    await until(lambda: "edge" in panel.node.options, what="the new node in the dropdown")
    panel.node.value, panel.service.value, panel.handler.value = "edge", "svc.edge", "echo"
    panel.advertise_button.click()
    await panel.last_task
    assert (await lab.node("node-1").call("svc.edge", [1])).value == {"echo": [1], "node": "edge"}
