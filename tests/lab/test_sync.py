"""Sync twins made by one rule for every async method of Lab and LabNode; an un-awaited call is an error."""

from __future__ import annotations

import inspect

import pytest

from macula_lab import Lab
from macula_lab.lab.nodes import AttachedNode, LabNode, LocalNode
from macula_lab.lab.sync import AsyncFirst, NotAwaited, WrongLoop

REALM = "com.test.sync"


def _async_names(cls) -> set[str]:
    return {
        name
        for name in dir(cls)
        if not name.startswith("_") and inspect.iscoroutinefunction(getattr(getattr(cls, name), "_async_first", None))
    }


def test_every_async_method_has_a_twin():
    for cls in (Lab, LabNode, LocalNode, AttachedNode):
        names = _async_names(cls)
        assert names, cls
        # nothing async left unwrapped: each public coroutine function went through the rule
        raw = {n for n, v in inspect.getmembers(cls) if not n.startswith("_") and inspect.iscoroutinefunction(v)}
        # the constructors are classmethods with twins of their own (Lab.start_sync, Lab.attach_sync)
        constructors = {"start", "attach"} if cls is Lab else set()
        assert raw == constructors, f"{cls.__name__}: {raw - constructors} escaped the rule"
        assert all(callable(getattr(cls, f"{n}_sync")) for n in constructors)
    assert {"advertise", "unadvertise", "discover", "call", "inspect"} <= _async_names(LocalNode)
    assert {"stop", "add_node", "stop_node", "kill_node", "sample", "wait_joined", "attach_client"} <= _async_names(Lab)
    assert {"detach"} <= _async_names(AttachedNode)


def test_a_script_uses_the_node_twins_and_gets_an_error_without_them():
    lab = Lab.start_sync(2, realm=REALM, transport="memory", sample_interval=None)
    try:
        node = lab.node("node-1")
        assert "advertise_sync" in dir(node) and "sample_sync" in dir(lab)
        assert node.advertise_sync("svc.sync", "whoami", ttl=30) >= 1
        res = lab.node("node-2").call_sync("svc.sync")
        assert res.value == {"node": "node-1"} and res.provider == "node-1"
        assert [p.metadata["node"] for p in lab.node("node-2").discover_sync("svc.sync")] == ["node-1"]
        assert "node-1" in lab.sample_sync()
        # the lab's older twins take the node first; same engine underneath
        assert lab.call_sync("node-2", "svc.sync").provider == "node-1"
        # what used to return a coroutine silently (only a RuntimeWarning, later)
        with pytest.raises(NotAwaited, match=r"advertise_sync"):
            node.advertise("svc.other", "whoami")
        with pytest.raises(NotAwaited, match=r"sample_sync"):
            lab.sample()
        with pytest.raises(AttributeError):
            node.nothing_sync()
        with pytest.raises(AttributeError):
            node.require_running_sync()  # a sync method has no twin
        lab.add_node_sync()
        assert lab.names == ["node-1", "node-2", "node-3"]
    finally:
        lab.stop_sync()
    assert lab.stopped


async def test_twins_refuse_the_labs_own_loop():
    lab = await Lab.start(1, realm=REALM, transport="memory", sample_interval=None)
    try:
        with pytest.raises(WrongLoop, match="await the async method"):
            lab.node("node-1").inspect_sync()
    finally:
        await lab.stop()


def test_a_never_started_object_says_so():
    class Thing(AsyncFirst):
        def _sync_loop(self):
            return None

        async def work(self) -> int:
            return 1

    with pytest.raises(NotAwaited, match="never started"):
        Thing().work_sync()
