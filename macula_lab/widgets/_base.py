"""What every lab view shares: the lab, a status line, actions run as lab tasks, clean closing.

A view subscribes to :meth:`Lab.on_sample <macula_lab.lab.Lab.on_sample>` and
redraws from ``lab.snapshots`` / ``lab.recorder`` (state the lab already holds:
a view never awaits the network to draw).  Buttons start coroutines with
:meth:`LabView.run`, which runs them as tasks the lab owns on the lab's loop
(the kernel's loop in a notebook), keeps the task as ``view.last_task`` (tests
and cells can await it) and reports the outcome in ``view.status``: an error of the action is
shown in the widget (and kept in ``view.last_error``), never swallowed; a bug
while showing a result is a background error (``lab.errors``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import json
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import ipywidgets as w

if TYPE_CHECKING:
    from ..lab.lab import Lab

#: one colour per node name, stable across the views
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip

OK, ERROR, BUSY = "ok", "error", "busy"
_COLOURS = {OK: "#1a7f37", ERROR: "#b00020", BUSY: "#555"}


def colour(name: str, names: list[str]) -> str:
    return PALETTE[names.index(name) % len(PALETTE)] if name in names else "#999"


def error_text(exc: BaseException) -> str:
    """``TypeName: message`` (the names of the engine's errors are what users act on)."""
    return f"{type(exc).__name__}: {exc}"


def pretty(value: Any) -> str:
    try:
        return json.dumps(value, indent=1, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(value)


def figure_widget(figure: Any = None, **kw: Any) -> Any:
    """A plotly FigureWidget whose comm opens with its traces and layout already in its state.

    plotly opens the comm first and sends the data as an update right after; a browser
    that builds the view between the two (a busy page, a re-run cell) drew empty
    default axes and never the data.  Here the comm opens once the state is complete.
    """
    import plotly.graph_objects as go

    class _FigureWidget(go.FigureWidget):
        _defer_open = True

        def open(self) -> None:
            if not self._defer_open:
                super().open()

    widget = _FigureWidget(figure, **kw) if figure is not None else _FigureWidget(**kw)
    widget._defer_open = False
    widget.open()
    return widget


def keep_figure_state(figure: Any) -> None:
    """Make a FigureWidget's synced state (what a new browser view is drawn from) its current figure.

    plotly sends changes as deltas that only views apply (to themselves and to the
    browser-side model); it refreshes that state itself only when the FigureWidget is
    displayed on its own, never inside a box.  A view made later (the output scrolled
    into existence, the tab reloaded, the widget displayed again) was drawn from the
    state at construction, and the next deltas named traces it did not have: a blank
    plot, "trace index is out of bounds".  (traitlets sends nothing when unchanged.)
    """
    from copy import deepcopy

    figure._widget_data = deepcopy(figure._data)
    figure._widget_layout = deepcopy(figure._layout_obj._props)


class LabView(w.VBox):
    """Base of the lab widgets: a VBox bound to a lab, refreshed after every sampling pass."""

    css_class = "macula-view"

    def __init__(self, lab: Lab, **kwargs: Any):
        super().__init__(**kwargs)
        self.lab = lab
        self.status = w.HTML(layout=w.Layout(min_height="1.6em"))
        self.status.add_class(f"{self.css_class}-status")
        self.add_class("macula-view")
        self.add_class(self.css_class)
        #: the task of the latest action (await it to wait for the action's effect)
        self.last_task: asyncio.Task | concurrent.futures.Future | None = None
        #: the latest action's error (``None`` after a success)
        self.last_error: BaseException | None = None
        self._closed = False
        lab.on_sample(self._on_sample)

    # ------------------------------------------------------------ refresh
    def _on_sample(self, lab: Lab) -> None:
        if not self._closed:
            self.refresh()

    def refresh(self) -> None:
        """Redraw from the lab's latest state (called after every sampling pass)."""

    # ------------------------------------------------------------ status
    def set_status(self, text: str, kind: str = OK) -> None:
        self.status.value = (
            f"<span class='macula-{kind}' style='color:{_COLOURS[kind]}'>{html.escape(text)}</span>"
        )

    @property
    def status_text(self) -> str:
        """The status line as plain text (what a person reads)."""
        return html.unescape(re.sub(r"<[^>]+>", "", self.status.value))

    # ------------------------------------------------------------ actions
    def run(
        self,
        make: Callable[[], Awaitable[Any]],
        what: str,
        done: Callable[[Any], None] | None = None,
        *,
        buttons: tuple[w.Button, ...] = (),
    ) -> asyncio.Task | concurrent.futures.Future:
        """Run ``make()`` as a lab task: ``done(result)`` on success, the error shown on failure.

        Called from a button callback: in a kernel that is the kernel's loop, where
        the lab lives; a lab on another loop (the sync twins) gets the coroutine
        handed over thread-safely.  ``buttons`` are disabled while it runs.
        """
        self.set_status(f"{what} ...", BUSY)
        for b in buttons:
            b.disabled = True

        async def action() -> Any:
            try:
                result = await make()
            except Exception as exc:
                # the user's own action failed: shown where it was asked for (and kept in
                # last_error), not in lab.errors, which holds failures of background work
                self.last_error = exc
                self.set_status(f"{what} failed: {error_text(exc)}", ERROR)
                return None
            finally:
                for b in buttons:
                    b.disabled = False
            self.last_error = None
            if done is not None:
                try:
                    done(result)
                except Exception as exc:  # a drawing bug is an error too
                    self.last_error = exc
                    self.set_status(f"{what}: showing the result failed: {error_text(exc)}", ERROR)
                    self.lab.report_error(f"widget {type(self).__name__}: {what}", exc)
            return result

        task = self._spawn(action(), f"widget:{what}")
        self.last_task = task
        return task

    def _spawn(self, coro, name: str) -> asyncio.Task | concurrent.futures.Future:
        loop = self.lab.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            return self.lab.spawn(coro, name=name)

        async def on_lab_loop() -> Any:
            return await self.lab.spawn(coro, name=name)

        return asyncio.run_coroutine_threadsafe(on_lab_loop(), loop)

    def fail(self, what: str, exc: BaseException) -> None:
        """Show an error found before any task started (bad input): no task, no engine call."""
        self.last_error = exc
        self.last_task = None
        self.set_status(f"{what}: {error_text(exc)}", ERROR)

    # ------------------------------------------------------------ nodes
    def _sync_node_options(self, dropdown: w.Dropdown) -> None:
        """Offer the running nodes only: a stopped or killed node cannot advertise or call."""
        names = [n.name for n in self.lab.running_nodes()]
        if list(dropdown.options) != names:
            value = dropdown.value
            dropdown.options = names
            if value in names:
                dropdown.value = value

    def running(self, name: str) -> bool:
        """Whether the lab's node ``name`` runs (False for a stopped or killed one; True for non-lab names)."""
        try:
            return self.lab.node(name).running
        except KeyError:
            return True

    # ------------------------------------------------------------ closing
    def close(self) -> None:
        """Unsubscribe from the lab and close this view's widgets (their comms)."""
        if not self._closed:
            self._closed = True
            self.lab.remove_listener(self._on_sample)
            self._close_children(self)
        super().close()

    @staticmethod
    def _close_children(box: w.Box) -> None:
        for child in box.children:
            if isinstance(child, w.Box):
                LabView._close_children(child)
            child.close()

    @property
    def closed(self) -> bool:
        return self._closed
