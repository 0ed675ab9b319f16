"""Widgets to drive and watch a lab in JupyterLab (needs the ``notebook`` extra).

``lab.dashboard()`` (:func:`dashboard`) composes them; each is usable alone:

- :class:`AdvertisePanel`: advertise / unadvertise a service from a node;
- :class:`CallPanel`: call a service from a node, see result, provider, latency, errors;
- :class:`NodesPanel`: stop, kill or add a node (with confirmation);
- :class:`TTLWatch`: advertisements and stored records counting down;
- :class:`MetricsDashboard`: live plotly charts of the lab's metrics;
- :class:`TopologyView`: the nodes on the id ring and their routing-table links;
- :class:`WatchPanel`: one service's provider changes, live (``lab.watch_panel(service)``).

They only read the lab's sampled state (``lab.snapshots``, ``lab.recorder``,
refreshed through ``lab.on_sample``) and call the :class:`~macula_lab.lab.nodes.LabNode`
API, so they work the same on a local and an attached lab.  Button actions run
as lab tasks on the kernel's loop (``view.last_task``); failures are shown in
the widget (``view.status``, ``view.last_error``).  ``view.close()``
unsubscribes from the lab.
"""

from ._base import LabView
from .advertise import AdvertisePanel
from .call import CallPanel
from .dashboard import Dashboard, dashboard
from .metrics import MetricsDashboard
from .nodes import NodesPanel
from .topology import TopologyView
from .ttl import TTLWatch
from .watch import WatchPanel, watch_panel

__all__ = [
    "AdvertisePanel",
    "CallPanel",
    "Dashboard",
    "LabView",
    "MetricsDashboard",
    "NodesPanel",
    "TTLWatch",
    "TopologyView",
    "WatchPanel",
    "dashboard",
    "watch_panel",
]
