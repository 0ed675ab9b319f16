"""Node controls: stop and kill ask first, then act on the real node; add joins a new one."""

from __future__ import annotations

from macula_lab.widgets.nodes import NodesPanel

from .test_base import lab_fixture, until  # noqa: F401  (the lab fixture)


async def test_kill_asks_first_then_kills(lab):
    panel = NodesPanel(lab)
    try:
        assert list(panel.node.options) == ["node-1", "node-2", "node-3"] and panel.node.value == "node-3"
        panel.kill_button.click()
        # nothing happens before the confirmation
        assert panel.confirm_row.layout.display == "flex" and "kill (abrupt, no goodbye) node-3?" in panel.question.value
        assert lab.node("node-3").running and panel.last_task is None
        panel.cancel_button.click()
        assert panel.confirm_row.layout.display == "none" and lab.node("node-3").running
        panel.confirm_button.click()  # nothing pending: no action
        assert panel.last_task is None and lab.node("node-3").running
        panel.kill_button.click()
        panel.confirm_button.click()
        assert await panel.last_task == "node-3"
        assert not lab.node("node-3").running and panel.status_text == "node-3 killed"
        assert list(panel.node.options) == ["node-1", "node-2"]  # refreshed by the sample it took
        panel.node.value = "node-2"
        panel.stop_button.click()
        assert "stop (graceful) node-2?" in panel.question.value
        panel.confirm_button.click()
        await panel.last_task
        assert not lab.node("node-2").running and panel.status_text == "node-2 stopped"
        panel.add_button.click()
        name = await panel.last_task
        assert name == "node-4" and lab.node(name).running and panel.status_text == "node-4 joined"
        assert name in panel.node.options
    finally:
        panel.close()
