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

FAULTS = ("no_readvertise", "late_readvertise")


class FaultNotPossible(MaculaError):
    code = "fault_not_possible"


def stop_readvertising(lab: Lab, node: str, service: str) -> None:
    handle = lab.node(node)
    if not handle.is_local:
        raise FaultNotPossible(f"{node} is attached: its re-advertisement timer runs in its own process")
    if not handle.node.services.stop_readvertising(service):
        raise FaultNotPossible(f"{node} does not advertise {service}")


def delay_readvertising(lab: Lab, node: str, service: str, seconds: float) -> None:
    handle = lab.node(node)
    if not handle.is_local:
        raise FaultNotPossible(f"{node} is attached: its re-advertisement timer runs in its own process")
    if not handle.node.services.delay_readvertising(service, seconds):
        raise FaultNotPossible(f"{node} does not advertise {service}")


def inject(lab: Lab, faults: dict[str, str] | None, service: str) -> list[str]:
    """Apply ``{node: fault}`` after the advertisements; returns what was done (for the report).

    ``late_readvertise`` delays the provider's next fire by one TTL: its record lapses first.
    """
    done = []
    for node, fault in (faults or {}).items():
        if fault == "no_readvertise":
            stop_readvertising(lab, node, service)
            done.append(f"fault injected: {node} never re-advertises {service}")
        elif fault == "late_readvertise":
            ttl = _ttl(lab, node, service)
            delay_readvertising(lab, node, service, ttl)
            done.append(f"fault injected: {node} re-advertises {service} {ttl:g}s late")
        else:
            raise FaultNotPossible(f"unknown fault {fault!r}; known: {list(FAULTS)}")
    return done


def _ttl(lab: Lab, node: str, service: str) -> float:
    handle = lab.node(node)
    ad = handle.node.services.ads.get(service) if handle.is_local else None
    if ad is None:
        raise FaultNotPossible(f"{node} does not advertise {service} in this process")
    return ad.ttl
