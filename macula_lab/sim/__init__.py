"""Simulations: the same node code on the simulated network and a virtual clock (issue 16)."""

from .clock import VirtualTimeLoop
from .simulation import SimNode, Simulation

__all__ = ["SimNode", "Simulation", "VirtualTimeLoop"]
