"""Call panel: call a service from a node and show the result, the provider, the latency.

    panel = CallPanel(lab)
    panel.node.value, panel.service.value = "node-2", "test.calculator"
    panel.args.value = '{"operation": "add", "a": 10, "b": 5}'
    panel.call_button.click(); await panel.last_task
    panel.result.value          # {'result': 15, 'node': 'node-1'}  (the CallResult)

The args are JSON, checked as they are typed and again on click (bad JSON never
reaches the engine); errors of the call (``ServiceNotFound``, ``AllProvidersFailed``
with each attempt's cause, ``CallTimeout``, ``RemoteError``) are shown by name.
"""

from __future__ import annotations

import html
import json
from collections import deque
from typing import TYPE_CHECKING, Any

import ipywidgets as w

from ..core.selection import STRATEGIES
from ._base import LabView, pretty

if TYPE_CHECKING:
    from ..lab.lab import Lab
    from ..runtime.services import CallResult

DEFAULT_STRATEGY = "(node default)"


class CallPanel(LabView):
    """Node, service, JSON args, strategy, timeout; a call button; the result or the error."""

    css_class = "macula-call"

    def __init__(
        self,
        lab: Lab,
        *,
        service: str = "test.calculator",
        args: str = '{"operation": "add", "a": 10, "b": 5}',
        history: int = 8,
    ):
        super().__init__(lab)
        names = [n.name for n in lab.running_nodes()]
        first = names[1] if len(names) > 1 else (names[0] if names else None)
        self.node = w.Dropdown(options=names, value=first, description="from node")
        self.service = w.Combobox(
            value=service, options=[], ensure_option=False, description="service", continuous_update=True
        )
        self.args = w.Textarea(value=args, description="args (JSON)", rows=3, continuous_update=True)
        self.strategy = w.Dropdown(
            options=[DEFAULT_STRATEGY, *STRATEGIES], value=DEFAULT_STRATEGY, description="strategy"
        )
        self.timeout = w.BoundedFloatText(value=5.0, min=0.1, max=120.0, step=0.5, description="timeout (s)")
        self.call_button = w.Button(description="call", button_style="success", icon="play")
        self.call_button.add_class("macula-call-button")
        self.call_button.on_click(lambda _b: self.call())
        self.args_check = w.HTML()
        self.output = w.HTML()
        self.output.add_class("macula-call-result")
        self.history_view = w.HTML()
        #: the latest successful CallResult (value, provider, latency, attempts)
        self.result: CallResult | None = None
        #: recent calls, newest last: dicts with service, node, ok, provider, latency_ms, text
        self.history: deque[dict[str, Any]] = deque(maxlen=history)
        self.args.observe(lambda _c: self._check_args(), "value")
        self._check_args()
        self.children = [
            w.HTML("<b>Call a service</b>"),
            self.node,
            self.service,
            self.args,
            self.args_check,
            self.strategy,
            self.timeout,
            self.call_button,
            self.status,
            self.output,
            self.history_view,
        ]
        self.refresh()

    # ------------------------------------------------------------ args
    def parse_args(self) -> Any:
        """The args as a Python value; an empty box means no args (``None``).  Raises ValueError."""
        text = self.args.value.strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"args are not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None

    def _check_args(self) -> bool:
        try:
            self.parse_args()
        except ValueError as exc:
            self.args_check.value = f"<span style='color:#b00020'>{html.escape(str(exc))}</span>"
            return False
        self.args_check.value = ""
        return True

    # ------------------------------------------------------------ call
    def call(self):
        """Call the chosen service with the args (returns the task, or ``None`` for bad input)."""
        node, service = self.node.value, self.service.value.strip()
        if not node or not service:
            self.fail("call", ValueError("choose a node and enter a service name"))
            return None
        try:
            args = self.parse_args()
        except ValueError as exc:
            self._check_args()
            self.fail("call", exc)
            self.output.value = ""
            return None
        strategy = None if self.strategy.value == DEFAULT_STRATEGY else self.strategy.value
        timeout = float(self.timeout.value)

        async def go() -> CallResult:
            try:
                return await self.lab.node(node).call(service, args, strategy=strategy, timeout=timeout)
            except Exception as exc:
                self.result = None
                self.output.value = _error_html(exc)
                self._remember(service, node, False, None, None, f"{type(exc).__name__}", _failed_how(exc))
                raise

        return self.run(go, f"call {service} from {node}", self._show, buttons=(self.call_button,))

    def _show(self, res: CallResult) -> None:
        self.result = res
        ms = res.latency * 1000.0
        self.set_status(f"{res.service} answered by {res.provider} in {ms:.2f} ms")
        attempts = "".join(
            f"<li>{html.escape(a.provider)}: {a.duration * 1000:.2f} ms"
            + (f" — {html.escape(str(a.error))}" if a.error else " ok")
            + "</li>"
            for a in res.attempts
        )
        self.output.value = (
            "<div class='macula-call-ok'>"
            f"<pre style='margin:2px 0'>{html.escape(pretty(res.value))}</pre>"
            f"<div>provider <b class='macula-call-provider'>{html.escape(res.provider)}</b> "
            f"<code>{html.escape(res.endpoint)}</code> · latency <b>{ms:.2f} ms</b>"
            f" · {'cache hit' if res.cache_hit else 'looked up in the DHT'}</div>"
            f"<details><summary>{len(res.attempts)} attempt(s)</summary><ul>{attempts}</ul></details></div>"
        )
        self._remember(res.service, self.node.value, True, res.provider, ms, pretty(res.value), res._how())

    def _remember(self, service, node, ok, provider, ms, text, how: str = "") -> None:
        self.history.append(
            {"service": service, "node": node, "ok": ok, "provider": provider, "latency_ms": ms, "text": text,
             "how": how}
        )  # fmt: skip
        rows = "".join(
            f"<tr><td>{html.escape(h['node'])}</td><td>{html.escape(h['service'])}</td>"
            f"<td>{html.escape(h['provider'] or '—')}</td>"
            f"<td>{_ms(h['latency_ms'])}</td><td>{html.escape(h['how'])}</td>"
            f"<td style='color:{'#1a7f37' if h['ok'] else '#b00020'}'>{html.escape(h['text'][:60])}</td></tr>"
            for h in reversed(self.history)
        )
        self.history_view.value = (
            "<table class='macula-call-history' style='font-size:90%'><thead><tr><th>from</th>"
            f"<th>service</th><th>provider</th><th>ms</th><th>how</th><th>result</th></tr></thead><tbody>{rows}</tbody></table>"
        )

    # ------------------------------------------------------------ refresh
    def refresh(self) -> None:
        self._sync_node_options(self.node)
        services = sorted(_known_services(self.lab))
        if list(self.service.options) != services:
            self.service.options = services


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _known_services(lab: Lab) -> set[str]:
    """Service names the lab has seen (advertised, stored, cached): suggestions for the service box."""
    names: set[str] = set()
    for snap in lab.snapshots.values():
        names.update(a["service"] for a in snap.get("advertisements") or [])
        names.update(r["metadata"].get("service", "") for r in snap.get("records") or [])
        names.update(e["service"] for e in (snap.get("cache") or {}).get("entries", []))
    names.discard("")
    return names


def _failed_how(exc: BaseException) -> str:
    tried = [a.provider for a in getattr(exc, "attempts", None) or ()]
    return f"tried {', '.join(tried)}" if tried else ""


def _error_html(exc: BaseException) -> str:
    name = type(exc).__name__
    extra = ""
    attempts = getattr(exc, "attempts", None)
    if attempts:
        extra = (
            "<ul>"
            + "".join(f"<li>{html.escape(a.provider)}: {html.escape(str(a.error))}</li>" for a in attempts)
            + "</ul>"
        )
    return (
        f"<div class='macula-call-error' style='color:#b00020'><b>{html.escape(name)}</b>: "
        f"{html.escape(str(exc))}{extra}</div>"
    )
