"""Watch panel: one service's provider-set changes, live, as they arrive (``lab.watch_panel(service)``).

The panel runs ``lab.node(node).watch(service)`` as a lab task and redraws
an HTML table per event: the current providers, then the latest changes
(newest first, index, kind, provider, endpoint, when).  Unlike the other views
it does not wait for the lab's sampling: a watch is pushed, so the table moves
when the mesh does.  The model is :class:`~macula_lab.core.watch.WatchLog`
(``panel.changes``); closing the panel ends the watch.
"""

from __future__ import annotations

import asyncio
import html
import time
from typing import TYPE_CHECKING, Any

import ipywidgets as w

from ..core.watch import WatchLog
from ._base import ERROR, OK, LabView, error_text

if TYPE_CHECKING:
    from ..lab.lab import Lab

_TABLE_STYLE = "border-collapse:collapse;font-size:90%;width:100%"
_CELL = "padding:1px 6px;border-bottom:1px solid #eee;text-align:left"
_KIND_COLOURS = {"added": "#1a7f37", "updated": "#0969da", "removed": "#b00020", "expired": "#9a6700", "reset": "#555"}


class WatchPanel(LabView):
    """A live table of ``service``'s provider changes, watched from lab node ``node`` (the first by default)."""

    css_class = "macula-watch"

    def __init__(self, lab: Lab, service: str, *, node: str | None = None, max_rows: int = 200):
        super().__init__(lab)
        self.service = service
        self.node = node or lab.names[0]
        self.changes = WatchLog(max_rows)
        self.table = w.HTML()
        self.table.add_class("macula-watch-table")
        self.children = [w.HTML(f"<b>Watching {html.escape(service)}</b> from {html.escape(self.node)}"), self.table, self.status]
        self._watch: Any = None
        self.redraw()
        self.task = self._spawn(self._follow(), f"widget:watch:{service}")

    async def _follow(self) -> None:
        try:
            self._watch = self.lab.node(self.node).watch(self.service)
            self.set_status("watching", OK)
            async for event in self._watch:
                self.changes.apply(event)
                self.redraw()
            if not self._closed:
                self.set_status("the watch ended (the node stopped)", ERROR)
        except Exception as exc:  # shown in the panel and kept in lab.errors
            self.last_error = exc
            self.set_status(f"watch failed: {error_text(exc)}", ERROR)
            self.lab.report_error(f"widget WatchPanel: watch {self.service}", exc)

    def redraw(self) -> None:
        providers = "".join(
            f"<tr><td style='{_CELL}'>{html.escape(p.name)}</td><td style='{_CELL}'>{html.escape(p.endpoint)}</td>"
            f"<td style='{_CELL}'>{p.node_id[:12]}</td></tr>"
            for p in self.changes.current()
        ) or f"<tr><td style='{_CELL}' colspan=3><i>no providers</i></td></tr>"
        changes = "".join(
            f"<tr class='macula-watch-{r['kind']}'><td style='{_CELL}'>{r['index']}</td>"
            f"<td style='{_CELL};color:{_KIND_COLOURS.get(r['kind'], '#000')}'><b>{r['kind']}</b></td>"
            f"<td style='{_CELL}'>{html.escape(r['provider'])}</td><td style='{_CELL}'>{html.escape(r['endpoint'])}</td>"
            f"<td style='{_CELL}'>{time.strftime('%H:%M:%S', time.localtime(r['at']))}</td></tr>"
            for r in self.changes.rows
        ) or f"<tr><td style='{_CELL}' colspan=5><i>waiting for the first event</i></td></tr>"
        head = "".join(f"<th style='{_CELL}'>{h}</th>" for h in ("index", "change", "provider", "endpoint", "at"))
        self.table.value = (
            f"<b>Providers now</b> ({len(self.changes.providers)})<table style='{_TABLE_STYLE}'>{providers}</table>"
            f"<b>Changes</b> (newest first)<table style='{_TABLE_STYLE}'><tr>{head}</tr>{changes}</table>"
        )

    def rows(self) -> list[dict[str, Any]]:
        """The changes shown, newest first (what the table draws)."""
        return list(self.changes.rows)

    def close(self) -> None:
        watch, loop = self._watch, self.lab.loop
        if watch is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if loop is not None and running is not loop:  # a lab on its own loop (the sync twins)
                loop.call_soon_threadsafe(watch.close)
            else:
                watch.close()
        super().close()


def watch_panel(lab: Lab, service: str, **options: Any) -> WatchPanel:
    """The ``watch`` view (``lab.watch_panel(service)``)."""
    return WatchPanel(lab, service, **options)
