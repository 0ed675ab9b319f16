"""The lab: nodes in this kernel or attached elsewhere, sampled, measured and driven.

- :mod:`.lab`: :class:`Lab` (start, attach, add/stop/kill nodes, sampling);
- :mod:`.nodes`: the lab's handle on one node, local or attached;
- :mod:`.client`: attached clients (:func:`connect`), a session to a node elsewhere;
- :mod:`.metrics`: the tidy metrics table built from the samples;
- :mod:`.sync`: the ``*_sync`` twins for plain scripts;
- :mod:`.load`: open-loop load generation and saturation search (``macula-lab load``).
"""

from .lab import Lab, LabError, NeedsMemoryNetwork, NoSuchNode

__all__ = ["Lab", "LabError", "NeedsMemoryNetwork", "NoSuchNode"]
