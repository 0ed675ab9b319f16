"""The dashboard: every lab view on one page (``lab.dashboard()``).

    lab status
    nodes (stop, kill, add)
    advertise | call
    TTL watch (advertisements and stored records)
    metrics
    topology
    background errors

A grid rather than tabs, so the plots are laid out while visible (plotly sizes
itself to its container) and a screenshot shows everything.  Closing the
dashboard closes every view and unsubscribes them from the lab.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets as w

from ._base import LabView
from .advertise import AdvertisePanel
from .call import CallPanel
from .metrics import MetricsDashboard
from .nodes import NodesPanel
from .topology import TopologyView
from .ttl import TTLWatch

if TYPE_CHECKING:
    from ..lab.lab import Lab


class Dashboard(LabView):
    """``advertise``, ``call``, ``ttl``, ``metrics``, ``topology`` views and a lab ``header``."""

    css_class = "macula-dashboard"

    def __init__(
        self,
        lab: Lab,
        handlers: dict[str, Callable[[Any], Any]] | None = None,
        *,
        tick: float | None = 0.5,
        window: float = 300.0,
        errors_shown: int = 5,
    ):
        super().__init__(lab)
        self.errors_shown = errors_shown
        self.advertise = AdvertisePanel(lab, handlers)
        self.call = CallPanel(lab)
        self.nodes = NodesPanel(lab)
        self.ttl = TTLWatch(lab, tick=tick)
        self.metrics = MetricsDashboard(lab, window=window)
        self.topology = TopologyView(lab)
        self.header = w.HTML()
        self.header.add_class("macula-dashboard-header")
        self.errors_view = w.HTML()
        self.errors_view.add_class("macula-dashboard-errors")
        half = {"flex": "1 1 0", "min_width": "320px", "padding": "4px"}
        for view in (self.advertise, self.call):
            view.layout = w.Layout(**half)
        # plots full width, one under the other: plotly sizes itself to its container when drawn
        self.children = [
            self.header,
            self.nodes,
            w.HBox([self.advertise, self.call], layout=w.Layout(flex_flow="row wrap")),
            self.ttl,
            self.metrics,
            self.topology,
            self.errors_view,
        ]
        self.refresh()

    @property
    def views(self) -> list[LabView]:
        return [self.nodes, self.advertise, self.call, self.ttl, self.metrics, self.topology]

    def refresh(self) -> None:
        lab = self.lab
        running = len(lab.running_nodes())
        sampled = max((s.get("time", 0.0) for s in lab.snapshots.values()), default=0.0)
        age = f", sampled {time.time() - sampled:.1f} s ago" if sampled else ", not sampled yet"
        self.header.value = (
            f"<b>macula lab</b> · {html.escape(lab.mode)} · realm <code>{html.escape(lab.realm)}</code>"
            f" · {html.escape(lab.transport if lab.mode == 'local' else 'attached')}"
            f" · {running}/{len(lab.names)} nodes running{'' if not lab.stopped else ' (stopped)'}{age}"
        )
        errors = list(lab.errors)[-self.errors_shown :]
        if errors:
            items = "".join(
                f"<li>{time.strftime('%H:%M:%S', time.localtime(e['at']))} {html.escape(e['where'])}: "
                f"{html.escape(e['error'])}</li>"
                for e in reversed(errors)
            )
            self.errors_view.value = (
                f"<details style='color:#b00020'><summary>{len(lab.errors)} error(s) in the lab "
                f"(latest first)</summary><ul>{items}</ul></details>"
            )
        else:
            self.errors_view.value = ""


def dashboard(lab: Lab, handlers: dict[str, Callable[[Any], Any]] | None = None, **kw: Any) -> Dashboard:
    """All the lab's views composed; ``handlers`` (name -> callable) join the built-ins."""
    return Dashboard(lab, handlers, **kw)
