"""Advertise panel: publish a service from a node, with a built-in handler or any Python callable.

    panel = AdvertisePanel(lab, handlers={"square": lambda a: a["x"] ** 2})
    panel.node.value, panel.service.value, panel.ttl.value = "node-1", "math.square", 60
    panel.handler.value = "square"
    panel.advertise_button.click(); await panel.last_task

Built-in handlers (``calculator``, ``echo``, ``whoami``, ``sleep``, ``fail``) are
made for the chosen node, so their replies name it; callables passed in code run
in this process (for an attached lab too: the node relays calls to it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets as w

from ..runtime.handlers import BUILTINS
from ._base import LabView

if TYPE_CHECKING:
    from ..lab.lab import Lab


class AdvertisePanel(LabView):
    """Node, service name, TTL, handler; advertise and unadvertise buttons."""

    css_class = "macula-advertise"

    def __init__(
        self,
        lab: Lab,
        handlers: dict[str, Callable[[Any], Any]] | None = None,
        *,
        service: str = "test.calculator",
        handler: str = "calculator",
        ttl: float = 60.0,
    ):
        super().__init__(lab)
        #: name -> callable, offered next to the built-ins
        self.handlers: dict[str, Callable[[Any], Any]] = {}
        names = [n.name for n in lab.running_nodes()]
        self.node = w.Dropdown(options=names, value=names[0] if names else None, description="node")
        self.service = w.Text(value=service, description="service", continuous_update=False)
        # a plain FloatText: a bounded one would clamp a bad TTL silently; the engine refuses it by name
        self.ttl = w.FloatText(value=ttl, step=10.0, description="TTL (s)")
        self.handler = w.Dropdown(options=list(BUILTINS), value=handler, description="handler")
        self.metadata = w.Text(value="", placeholder='{"zone": "a"} (optional JSON)', description="metadata")
        self.advertise_button = w.Button(description="advertise", button_style="primary", icon="bullhorn")
        self.unadvertise_button = w.Button(description="unadvertise", icon="times")
        self.advertise_button.add_class("macula-advertise-button")
        self.unadvertise_button.add_class("macula-unadvertise-button")
        self.advertise_button.on_click(lambda _b: self.advertise())
        self.unadvertise_button.on_click(lambda _b: self.unadvertise())
        for name, fn in (handlers or {}).items():
            self.add_handler(name, fn)
        self.children = [
            w.HTML("<b>Advertise a service</b>"),
            self.node,
            self.service,
            self.ttl,
            self.handler,
            self.metadata,
            w.HBox([self.advertise_button, self.unadvertise_button]),
            self.status,
        ]

    def add_handler(self, name: str, fn: Callable[[Any], Any]) -> None:
        """Offer ``fn`` (sync or async, one argument: the call's args) under ``name``."""
        if not callable(fn):
            raise TypeError(f"handler {name!r} must be callable, got {fn!r}")
        if name in BUILTINS:
            raise ValueError(f"{name!r} is a built-in handler name; pick another")
        self.handlers[name] = fn
        if name not in self.handler.options:
            self.handler.options = [*self.handler.options, name]

    def _chosen_handler(self) -> str | Callable[[Any], Any]:
        name = self.handler.value
        return self.handlers.get(name, name)  # a built-in by name: the engine makes it for the node

    def _inputs(self, what: str) -> tuple[str, str] | None:
        node, service = self.node.value, self.service.value.strip()
        if not node:
            self.fail(what, ValueError("choose a node"))
            return None
        if not service:
            self.fail(what, ValueError("enter a service name"))
            return None
        return node, service

    def advertise(self):
        """Advertise the chosen service from the chosen node (returns the task)."""
        inputs = self._inputs("advertise")
        if inputs is None:
            return None
        node, service = inputs
        try:
            metadata = json.loads(self.metadata.value) if self.metadata.value.strip() else None
            if metadata is not None and not isinstance(metadata, dict):
                raise ValueError("metadata must be a JSON object")
        except ValueError as exc:
            self.fail("advertise: bad metadata", exc)
            return None
        handler, ttl = self._chosen_handler(), float(self.ttl.value)
        label = self.handler.value

        def done(replicas: int) -> None:
            self.set_status(
                f"advertised {service} from {node} with {label} (TTL {ttl:g} s, {replicas} replicas)"
            )

        return self.run(
            lambda: self.lab.node(node).advertise(service, handler, ttl=ttl, metadata=metadata),
            f"advertise {service} on {node}",
            done,
            buttons=(self.advertise_button, self.unadvertise_button),
        )

    def unadvertise(self):
        """Withdraw the chosen service from the chosen node (returns the task)."""
        inputs = self._inputs("unadvertise")
        if inputs is None:
            return None
        node, service = inputs

        def done(removed: int) -> None:
            self.set_status(f"unadvertised {service} from {node} ({removed} replicas removed)")

        return self.run(
            lambda: self.lab.node(node).unadvertise(service),
            f"unadvertise {service} on {node}",
            done,
            buttons=(self.advertise_button, self.unadvertise_button),
        )

    def refresh(self) -> None:
        self._sync_node_options(self.node)
