"""Topology view: the nodes on the Kademlia ring and the links of their routing tables.

Each node sits on a circle at the angle of its node id (the 256-bit id space
as a ring: XOR-close ids are near each other), labelled with its name; a line
joins A and B when A's routing table holds B (both directions drawn once).
Contacts outside the lab (other nodes of an attached mesh, clients) are drawn
grey.  Marker size grows with the records a node stores; hover shows its
endpoint, contacts, records and advertised services.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go

from ._base import LabView, colour, figure_widget, keep_figure_state

if TYPE_CHECKING:
    from ..lab.lab import Lab


def ring_position(node_id_hex: str) -> tuple[float, float]:
    """(x, y) on the unit circle for a node id, clockwise from the top."""
    frac = int(node_id_hex[:16], 16) / float(1 << 64) if node_id_hex else 0.0
    angle = math.pi / 2 - 2 * math.pi * frac
    return math.cos(angle), math.sin(angle)


class TopologyView(LabView):
    """``figure`` (plotly FigureWidget); ``nodes()`` and ``edges()`` give what is drawn."""

    css_class = "macula-topology"

    def __init__(self, lab: Lab, *, height: int = 420):
        super().__init__(lab)
        links, points = self._drawing()
        axis = {"visible": False, "range": [-1.35, 1.35], "fixedrange": True}
        # built with its traces and their data: a FigureWidget whose traces are restyled
        # before the browser drew it once stays blank (a view made on a lab that already
        # sampled, a dashboard displayed again)
        self.figure = figure_widget(
            data=[
                go.Scatter(
                    mode="lines", line={"color": "#bbb", "width": 1}, hoverinfo="skip", name="links",
                    showlegend=False, meta="links", **links,
                ),
                go.Scatter(
                    mode="markers+text", textposition="top center", hovertemplate="%{hovertext}<extra></extra>",
                    name="nodes", showlegend=False, meta="nodes", **points,
                ),
            ],
            layout={
                "height": height,
                "margin": {"l": 10, "r": 10, "t": 30, "b": 10},
                "xaxis": axis,
                "yaxis": {**axis, "scaleanchor": "x"},
                "title": {"text": "routing tables", "x": 0.5, "font": {"size": 13}},
                "plot_bgcolor": "white",
            },
        )  # fmt: skip
        self.children = [self.figure, self.status]

    # ------------------------------------------------------------ data
    def nodes(self) -> dict[str, dict[str, Any]]:
        """node id (hex) -> name, lab membership, endpoint and counters, from the snapshots."""
        out: dict[str, dict[str, Any]] = {}
        for name, snap in list(self.lab.snapshots.items()):
            info = snap.get("node") or {}
            if not info.get("node_id"):
                continue
            gauges = (snap.get("metrics") or {}).get("gauges", {})
            out[info["node_id"]] = {
                "name": name,
                "in_lab": True,
                "running": self.running(name),
                "endpoint": info.get("endpoint", ""),
                "contacts": len(snap.get("routing") or []),
                "records": gauges.get("stored_records", len(snap.get("records") or [])),
                "services": [a["service"] for a in snap.get("advertisements") or []],
            }
        for snap in list(self.lab.snapshots.values()):
            for c in snap.get("routing") or []:
                if c["node_id"] not in out:
                    out[c["node_id"]] = {
                        "name": c.get("name") or c["node_id"][:8],
                        "in_lab": False,
                        "running": True,
                        "endpoint": c.get("endpoint", ""),
                        "contacts": None,
                        "records": None,
                        "services": [],
                    }
        return out

    def edges(self) -> set[tuple[str, str]]:
        """(holder, contact) name pairs: ``holder``'s routing table holds ``contact``.

        A stopped node has no links: its last snapshot's table is gone with it, and the
        entries others still hold for it lead nowhere (they time out).
        """
        nodes = self.nodes()
        names = {nid: n["name"] for nid, n in nodes.items()}
        stopped = {n["name"] for n in nodes.values() if not n["running"]}
        out = set()
        for name, snap in list(self.lab.snapshots.items()):
            if name in stopped:
                continue
            for c in snap.get("routing") or []:
                contact = names.get(c["node_id"], c["node_id"][:8])
                if not c.get("replacement") and contact not in stopped:
                    out.add((name, contact))
        return out

    # ------------------------------------------------------------ drawing
    def refresh(self) -> None:
        if self._closed:
            return
        links, points = self._drawing()
        with self.figure.batch_update():
            link_trace, point_trace = self.figure.data
            link_trace.update(links)
            point_trace.update(points)
        keep_figure_state(self.figure)

    def _drawing(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The links' and the nodes' trace values from the latest snapshots."""
        nodes = self.nodes()
        pos = {n["name"]: ring_position(nid) for nid, n in nodes.items()}
        ex: list[float | None] = []
        ey: list[float | None] = []
        for a, b in sorted({tuple(sorted(e)) for e in self.edges()}):
            if a in pos and b in pos:
                ex += [pos[a][0], pos[b][0], None]
                ey += [pos[a][1], pos[b][1], None]
        lab_names = self.lab.names
        ordered = sorted(nodes.values(), key=lambda n: (not n["in_lab"], n["name"]))
        hover = [
            f"<b>{n['name']}</b>{'' if n['running'] else ' (stopped)'}<br>{n['endpoint']}"
            + (
                f"<br>contacts {n['contacts']} · records {n['records']}"
                + (f"<br>serves {', '.join(n['services'])}" if n["services"] else "")
                if n["in_lab"]
                else "<br>(not in this lab)"
            )
            for n in ordered
        ]
        points = {
            "x": [pos[n["name"]][0] for n in ordered],
            "y": [pos[n["name"]][1] for n in ordered],
            "text": [n["name"] if n["running"] else f"{n['name']} (stopped)" for n in ordered],
            "hovertext": hover,
            "marker": {
                "size": [14 + min(20, 2 * (n["records"] or 0)) for n in ordered],
                "color": [colour(n["name"], lab_names) if n["in_lab"] and n["running"] else "#ccc" for n in ordered],
                "opacity": [1.0 if n["running"] else 0.5 for n in ordered],
                "line": {"width": [3 if n["services"] else 1 for n in ordered], "color": "#333"},
            },
        }
        return {"x": ex, "y": ey}, points
