"""Fault injection for procedures: make one provider misbehave, to see the checklist catch it.

``stop_readvertising(lab, "node-3", "test.calculator")``: the provider's
re-advertisement timer dies after it was scheduled (as a crashed timer process
would), so the advertisement stays listed but is never republished and its DHT
records expire after one TTL.  The checklist must then fail ("Timer fires at
correct interval", "Re-advertisement happens before TTL expiry", ...).

Only for nodes running in this process: an attached node's timers run in its
own process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import MaculaError

if TYPE_CHECKING:
    from ..lab.lab import Lab

FAULTS = ("no_readvertise",)


class FaultNotPossible(MaculaError):
    code = "fault_not_possible"


def stop_readvertising(lab: Lab, node: str, service: str) -> None:
    handle = lab.node(node)
    if not handle.is_local:
        raise FaultNotPossible(f"{node} is attached: its re-advertisement timer runs in its own process")
    if not handle.node.services.stop_readvertising(service):
        raise FaultNotPossible(f"{node} does not advertise {service}")


def inject(lab: Lab, faults: dict[str, str] | None, service: str) -> list[str]:
    """Apply ``{node: fault}`` after the advertisements; returns what was done (for the report)."""
    done = []
    for node, fault in (faults or {}).items():
        if fault == "no_readvertise":
            stop_readvertising(lab, node, service)
            done.append(f"fault injected: {node} never re-advertises {service}")
        else:
            raise FaultNotPossible(f"unknown fault {fault!r}; known: {list(FAULTS)}")
    return done
