"""Watch panel: a live table of one service's provider changes, opened by name from a lab."""

from __future__ import annotations

import asyncio

from macula_lab.widgets import WatchPanel

from .test_base import lab_fixture, until  # noqa: F401  (the lab fixture)


async def test_the_panel_lists_changes_as_they_arrive(lab):
    panel = lab.watch_panel("svc.panel", node="node-3")
    try:
        assert isinstance(panel, WatchPanel)
        await until(lambda: panel.rows(), 10, "the first event")
        assert panel.rows()[0]["kind"] == "reset" and "no providers" in panel.table.value
        await lab.node("node-1").advertise("svc.panel", "echo", metadata={"name": "node-1"})
        await until(lambda: panel.rows()[0]["kind"] == "added", 10, "added")
        assert panel.rows()[0]["provider"] == "node-1" and "macula-watch-added" in panel.table.value
        await lab.node("node-1").unadvertise("svc.panel")
        await until(lambda: panel.rows()[0]["kind"] == "removed", 10, "removed")
        assert [r["kind"] for r in panel.rows()] == ["removed", "added", "reset"]
        assert panel.changes.current() == [] and "no providers" in panel.table.value
        indexes = [r["index"] for r in panel.rows()]
        assert indexes == sorted(indexes, reverse=True)
    finally:
        panel.close()
    await asyncio.wait_for(panel.task, 5)  # closing ends the watch and its task
    assert panel.last_error is None


def test_a_panel_of_a_lab_on_its_own_loop_follows_and_closes_from_this_thread():
    import time

    from macula_lab import Lab

    lab = Lab.start_sync(2, realm="com.test.widgets.sync", sample_interval=None)
    try:
        panel = lab.watch_panel("svc.sync")

        def wait(cond, what: str) -> None:
            end = time.monotonic() + 10
            while not cond():
                assert time.monotonic() < end, what
                time.sleep(0.05)

        wait(lambda: panel.rows(), "the first event")
        lab.advertise_sync("node-1", "svc.sync", "echo", metadata={"name": "node-1"})
        wait(lambda: panel.rows()[0]["kind"] == "added", "added")
        panel.close()  # from this thread: the watch is closed on the lab's loop
        panel.task.result(timeout=5)
        assert panel.last_error is None
    finally:
        lab.stop_sync()
