"""The dashboard: all views composed, closed cleanly; the same widgets on an attached lab."""

from __future__ import annotations

import asyncio

from macula_lab import Lab
from macula_lab.widgets import Dashboard, dashboard

from ..conftest import client_args
from .test_base import REALM, lab_fixture, until  # noqa: F401  (the lab fixture)


async def test_dashboard_composes_the_views_and_closes_them(lab):
    before = len(lab._listeners)
    dash = lab.dashboard(handlers={"py": lambda a: {"py": a}})
    assert isinstance(dash, Dashboard) and "py" in dash.advertise.handler.options
    assert len(lab._listeners) == before + 7  # the dashboard and its six views
    assert "3/3 nodes running" in dash.header.value and dash.errors_view.value == ""
    dash.advertise.service.value = dash.call.service.value = "svc.py"
    dash.advertise.handler.value = "py"
    dash.advertise.advertise_button.click()
    await dash.advertise.last_task
    dash.call.args.value = "[1, 2]"
    dash.call.call_button.click()
    assert (await dash.call.last_task).value == {"py": [1, 2]}
    await until(lambda: dash.ttl.advertisement_rows(), what="the TTL watch row")
    # a failed call stays with the call; background failures are listed under the dashboard
    dash.call.service.value = "svc.missing"
    dash.call.call_button.click()
    await dash.call.last_task
    assert "ServiceNotFound" in dash.call.status_text
    lab.report_error("sampling node-9", TimeoutError("no answer"))
    await until(lambda: "sampling node-9: TimeoutError" in dash.errors_view.value, what="the error listed")
    assert "ServiceNotFound" not in dash.errors_view.value
    # running the cell again replaces the dashboard: the first one stops listening
    again = lab.dashboard()
    assert dash.closed and len(lab._listeners) == before + 7
    again.close()
    widgets = [dash, *dash.views, dash.advertise.advertise_button, dash.metrics.figure, dash.topology.figure]
    dash.close()
    assert len(lab._listeners) == before
    assert all(v.closed for v in dash.views) and all(x.comm is None for x in widgets)
    await asyncio.sleep(0)
    assert dash.ttl._ticker.done()


async def test_the_same_widgets_drive_an_attached_lab(node_processes, certs):
    urls = [p.endpoint for p in await node_processes(REALM, "w1dgets")]
    lab = await Lab.attach(
        urls, realm=REALM, **client_args(certs), token="w1dgets", sample_interval=0.2
    )
    served = []

    def local(args):  # runs here, in the lab's process; the node relays calls to it
        served.append(args)
        return {"local": args}

    dash = dashboard(lab, handlers={"local": local})
    try:
        assert lab.mode == "attached" and "attached" in dash.header.value
        # their orchestrator manages the nodes: no stop / kill / add from here
        assert all(b.disabled for b in (dash.nodes.stop_button, dash.nodes.kill_button, dash.nodes.add_button))
        ads, call = dash.advertise, dash.call
        ads.node.value, ads.service.value, ads.handler.value = "node-1", "test.calculator", "calculator"
        ads.advertise_button.click()
        assert await ads.last_task >= 1, ads.status_text
        call.node.value, call.service.value = "node-2", "test.calculator"
        call.args.value = '{"operation": "add", "a": 10, "b": 5}'
        call.call_button.click()
        res = await call.last_task
        assert res is not None, call.status_text
        assert res.value == {"result": 15, "node": "node-1"} and "answered by node-1" in call.status_text
        ads.node.value, ads.service.value, ads.handler.value = "node-3", "svc.local", "local"
        ads.advertise_button.click()
        await ads.last_task
        call.service.value, call.args.value = "svc.local", '"hi"'
        call.call_button.click()
        assert (await call.last_task).value == {"local": "hi"} and served == ["hi"]
        # the views read the nodes' inspection snapshots (admin token)
        await until(lambda: len(dash.ttl.advertisement_rows()) == 2, what="both advertisements watched")
        assert {(r["node"], r["service"]) for r in dash.ttl.advertisement_rows()} == {
            ("node-1", "test.calculator"),
            ("node-3", "svc.local"),
        }
        await until(
            lambda: any(t.meta == "rpc_rtt_ms" and t.name == "node-2" for t in dash.metrics.figure.data)
        )
        await until(
            lambda: {("node-1", "node-2"), ("node-2", "node-3")} <= dash.topology.edges(), what="links"
        )
        assert not [e for e in lab.errors if "Unauthorized" in e["error"]]
    finally:
        dash.close()
        await lab.stop()


async def test_a_killed_node_looks_dead_everywhere(lab):
    """After kill_node: greyed advertisement without a timer, no links, not offered as a target."""
    dash = lab.dashboard(tick=None)
    try:
        for name in ("node-1", "node-3"):
            await lab.node(name).advertise("svc.dead", "whoami", ttl=30)
        full = {(a, b) for a in lab.names for b in lab.names if a != b}
        await until(lambda: dash.topology.edges() == full, timeout=20, what="a full mesh of 3")
        await until(lambda: len(dash.ttl.advertisement_rows()) == 2, timeout=20, what="both advertisements")
        await lab.kill_node("node-3")
        await lab.sample()
        [row] = [r for r in dash.ttl.advertisement_rows() if r["node"] == "node-3"]
        # its last record still lives in the DHT for most of its TTL; no timer renews it
        assert not row["running"] and row["next_fire_in"] is None and row["expires_in"] > 10, row
        dash.ttl.render()
        page = dash.ttl.ads_view.value
        assert "node-3 (stopped)" in page and "not re-advertised" in page
        assert "in 0.0 s" not in page
        assert not any("node-3" == r["holder"] for r in dash.ttl.record_rows())
        # topology: greyed, labelled, no links either way
        assert not any("node-3" in e for e in dash.topology.edges()), dash.topology.edges()
        points = dash.topology.figure.data[1]
        i = list(points.text).index("node-3 (stopped)")
        assert points.marker.color[i] == "#ccc"
        links = dash.topology.figure.data[0]
        assert len(links.x) == 3  # node-1 <-> node-2 only
        # targets: only running nodes
        assert list(dash.call.node.options) == list(dash.advertise.node.options) == ["node-1", "node-2"]
        assert "2/3 nodes running" in dash.header.value
    finally:
        dash.close()
