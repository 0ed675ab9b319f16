"""What the checklist steps share: the lab, the roles of its nodes, the parameters, what was seen.

The testing guide's scenario has roles: providers (node-1, then node-3) advertise, a
consumer (node-2) discovers and calls.  :class:`ChecklistConfig` names them
(defaults: the first and the last node provide, the second consumes) and holds
the scaled-down times: a TTL of ``ttl`` seconds is re-advertised every
``0.8 * ttl`` seconds, exactly as 300 s is every 240 s.

:class:`Context` is the run's working state: the handler invocations the lab
saw, the inspection snapshots, the times of each publication.  Steps use only
the lab's node API (:class:`~macula_lab.lab.nodes.LabNode`), so the same steps
run on nodes in the kernel and on attached nodes (containers, pods, hosts).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.params import READVERTISE_FRACTION
from ..errors import MaculaError
from .progress import Progress

if TYPE_CHECKING:
    from ..lab.lab import Lab
    from ..lab.nodes import LabNode


@dataclass
class ChecklistConfig:
    """Parameters of the checklist (every time in seconds)."""

    service: str = "test.calculator"
    providers: list[str] | None = None  # node names; default: the first and the last node
    consumer: str | None = None  # default: the second node
    ttl: float = 3.0
    #: the discovery cache TTL the consumer should show (None: only measure it)
    cache_ttl: float | None = None
    call_timeout: float = 2.0
    #: re-advertisements each provider must make before "continues indefinitely" passes
    readvertise_cycles: int = 2
    #: how far (fraction of the interval) a fire may be from its schedule
    tolerance: float = 0.25
    #: wait this long (multiple of the interval) after unadvertise to see that no timer fires
    confirm_cancel: bool = True
    #: a service the nodes serve themselves (``--serve math.add=calculator``), checked if given
    served_service: str | None = None
    served_args: dict[str, Any] = field(default_factory=lambda: {"a": 50, "b": 7})
    args: dict[str, Any] = field(default_factory=lambda: {"operation": "add", "a": 10, "b": 5})
    #: seconds to wait for a publication to be visible from the consumer
    propagation_timeout: float = 5.0

    @property
    def interval(self) -> float:
        return self.ttl * READVERTISE_FRACTION


class ChecklistError(MaculaError):
    code = "checklist_error"


@dataclass
class Invocation:
    """One call that reached a handler the checklist advertised (handlers run in this process)."""

    provider: str
    args: Any
    at: float
    #: what the handler returned (what the caller should receive), or the exception it raised
    result: Any = None
    error: BaseException | None = None


class Context:
    def __init__(self, lab: Lab, config: ChecklistConfig, progress: Progress | None = None):
        self.lab = lab
        self.config = config
        self.progress = progress or Progress.null()
        names = [n.name for n in lab.running_nodes()]
        if len(names) < 2:
            raise ChecklistError(f"the checklist needs at least 2 running nodes, the lab has {names}")
        self.providers: list[str] = list(config.providers or dict.fromkeys([names[0], names[-1]]))
        self.consumer: str = config.consumer or names[1]
        for name in [*self.providers, self.consumer]:
            lab.node(name)  # raises NoSuchNode with the known names
        self.invocations: list[Invocation] = []
        self.published_at: dict[str, float] = {}  # provider -> wall time of its first publication
        self.advertised: set[str] = set()  # providers currently advertising config.service
        self.baseline: dict[str, dict[str, Any]] = {}  # node -> metrics gauges before the checklist
        #: node -> time (its own clock) of its newest event before the checklist: older ones are not ours
        self.cursor: dict[str, float] = {}
        self.started = time.time()

    def node(self, name: str) -> LabNode:
        return self.lab.node(name)

    def handler(self, provider: str):
        """The testing guide's calculator, run in this process, recording every invocation."""
        from ..runtime.handlers import make_handler

        calc = make_handler("calculator", provider)

        def handle(args: Any) -> Any:
            inv = Invocation(provider, args, time.time())
            self.invocations.append(inv)
            try:
                inv.result = calc(args)
            except Exception as exc:
                inv.error = exc
                raise
            return inv.result

        return handle

    async def inspect(self, name: str, sections: list[str], since: float = 0.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.node(name).inspect(sections, since), 10.0)

    async def advertisement(self, name: str, service: str | None = None) -> dict[str, Any] | None:
        """The re-advertisement timer row of ``service`` on node ``name`` (None: not advertised there)."""
        service = service or self.config.service
        snap = await self.inspect(name, ["advertisements"])
        return next((a for a in snap.get("advertisements") or [] if a["service"] == service), None)

    async def events(self, name: str, kinds: tuple[str, ...], service: str | None = None) -> list[dict]:
        service = service or self.config.service
        snap = await self.inspect(name, ["events"], self.cursor.get(name, self.started - 1.0))
        return [e for e in snap.get("events") or [] if e["kind"] in kinds and e["service"] == service]

    async def record_holders(self, service: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """node -> the live provider records of ``service`` it stores (inspection of every node)."""
        service = service or self.config.service
        out: dict[str, list[dict[str, Any]]] = {}
        for n in self.lab.running_nodes():
            snap = await self.inspect(n.name, ["records"])
            rows = [r for r in snap.get("records") or [] if r["metadata"].get("service") == service]
            if rows:
                out[n.name] = rows
        return out

    async def provider_names(self, refresh: bool = True, service: str | None = None) -> list[str]:
        entries = await self.node(self.consumer).discover(service or self.config.service, refresh=refresh)
        return sorted(str(e.metadata.get("node") or e.node_id.hex()[:12]) for e in entries)

    async def wait_for(self, predicate, timeout: float, interval: float = 0.1):
        """Poll the async ``predicate`` until it returns a truthy value or ``timeout`` passes (returns the last)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            value = await predicate()
            if value or loop.time() >= end:
                return value
            await asyncio.sleep(interval)
