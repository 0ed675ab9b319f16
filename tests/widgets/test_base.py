"""The widgets' shared behaviour: actions as lab tasks, errors shown and kept, clean closing.

Also home of the ``lab`` fixture the other ``test_widgets_*`` modules import: a real
3-node lab on QUIC loopback, sampled every 0.2 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from macula_lab import Lab
from macula_lab.widgets import AdvertisePanel, CallPanel, LabView, TTLWatch

REALM = "com.test.widgets"


@pytest.fixture(name="lab")
async def lab_fixture():
    lab = await Lab.start(3, realm=REALM, sample_interval=0.2)
    try:
        yield lab
    finally:
        await lab.stop()


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` (the sampler runs meanwhile) until it holds; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"{what} not reached within {timeout:g}s")
        await asyncio.sleep(0.05)


async def test_action_success_and_failure_are_shown(lab):
    view = LabView(lab)
    try:
        shown = []
        task = view.run(lambda: asyncio.sleep(0, result=42), "answer", shown.append)
        assert view.last_task is task and "answer ..." in view.status_text
        assert await task == 42 and shown == [42] and view.last_error is None

        async def boom():
            raise LookupError("no such thing")

        await view.run(boom, "lookup")
        assert view.status_text == "lookup failed: LookupError: no such thing"
        assert "macula-error" in view.status.value and isinstance(view.last_error, LookupError)
        # the user's action failed where they asked for it: not a background error of the lab
        assert not any("lookup" in e["where"] for e in lab.errors)
    finally:
        view.close()


async def test_close_unsubscribes_from_the_lab(lab):
    before = len(lab._listeners)
    view = LabView(lab)
    calls = []
    view.refresh = lambda: calls.append(1)
    assert len(lab._listeners) == before + 1
    await until(lambda: calls, what="a refresh after sampling")
    view.close()
    assert view.closed and len(lab._listeners) == before and view.comm is None
    n = len(calls)
    await lab.sample()
    assert len(calls) == n
    view.close()  # idempotent


async def test_buttons_are_disabled_while_the_action_runs(lab):
    panel = AdvertisePanel(lab)
    try:
        panel.handler.value = "echo"
        task = panel.advertise()
        assert panel.advertise_button.disabled and panel.unadvertise_button.disabled
        await task
        assert not panel.advertise_button.disabled and not panel.unadvertise_button.disabled
    finally:
        panel.close()


def test_widgets_drive_a_lab_running_on_another_loop():
    """The sync twins run the lab on a background loop: clicks hand their work over thread-safely."""
    lab = Lab.start_sync(2, realm=REALM, sample_interval=0.2)
    ads = calls = ttl = None
    try:
        ads, calls, ttl = AdvertisePanel(lab), CallPanel(lab), TTLWatch(lab)
        ads.service.value = calls.service.value = "svc.thread"
        ads.handler.value = "whoami"
        ads.advertise_button.click()
        assert ads.last_task.result(timeout=10) >= 1
        calls.node.value, calls.args.value = "node-2", ""
        calls.call_button.click()
        res = calls.last_task.result(timeout=10)
        assert res.value == {"node": "node-1"} and calls.result is res
        assert "answered by node-1" in calls.status_text
    finally:
        for view in (ads, calls, ttl):
            if view is not None:
                view.close()
        lab.stop_sync()


def test_figure_widgets_open_with_their_data(monkeypatch):
    """The comm opens with the traces in its state: a view built before the next message still draws them."""
    import ipywidgets.widgets.widget as widget_module
    import plotly.graph_objects as go

    from macula_lab.widgets._base import figure_widget

    opened: list[int] = []
    real_open = widget_module.Widget.open

    def watch(self):  # what the browser receives in the comm-open message
        if self.comm is None and self.has_trait("_widget_data"):
            opened.append(len(self.get_state()["_widget_data"]))
        return real_open(self)

    monkeypatch.setattr(widget_module.Widget, "open", watch)
    fig = figure_widget(data=[go.Scatter(x=[1, 2], y=[3, 4]), go.Scatter(x=[0], y=[0])])
    assert opened == [2] and fig.comm is not None
    opened.clear()
    go.FigureWidget(data=[go.Scatter(x=[1], y=[1])])
    assert opened == [0]  # plotly's own: empty at open, the data follows in an update
