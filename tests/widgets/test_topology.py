"""Topology view: nodes on the id ring, routing-table links from the nodes' snapshots."""

from __future__ import annotations

import math

from macula_lab.widgets import TopologyView
from macula_lab.widgets.topology import ring_position

from .test_base import lab_fixture, until  # noqa: F401  (the lab fixture)


def test_ring_position_is_on_the_unit_circle():
    assert ring_position("00" * 32) == (math.cos(math.pi / 2), 1.0)
    x, y = ring_position("80" + "00" * 31)  # half-way round
    assert abs(x) < 1e-9 and y == -1.0
    assert math.isclose(math.hypot(*ring_position("3f" * 32)), 1.0)


async def test_nodes_and_links_follow_the_routing_tables(lab):
    view = TopologyView(lab)
    try:
        full = {(a, b) for a in lab.names for b in lab.names if a != b}
        await until(lambda: view.edges() == full, what="a full mesh of 3")
        links, points = view.figure.data
        assert links.meta == "links" and points.meta == "nodes"
        assert list(points.text) == ["node-1", "node-2", "node-3"]
        assert len(links.x) == 3 * 3  # three undirected links, each x0, x1, None
        # the synced state a browser view is drawn from follows the figure (not its first draw)
        assert len(view.figure._widget_data[1]["x"]) == 3 and len(view.figure._widget_data[0]["x"]) == 9
        assert all(math.isclose(math.hypot(x, y), 1.0) for x, y in zip(points.x, points.y, strict=True))
        await lab.node("node-2").advertise("svc.topo", "whoami", ttl=30)
        await lab.add_node("edge")
        await until(lambda: "edge" in (view.figure.data[1].text or ()), what="the new node drawn")
        await until(lambda: ("edge", "node-1") in view.edges(), what="its links")
        await until(lambda: "serves svc.topo" in " ".join(view.figure.data[1].hovertext), what="hover")
        widths = view.figure.data[1].marker.line.width
        assert widths[list(view.figure.data[1].text).index("node-2")] == 3  # a provider is outlined
    finally:
        view.close()
