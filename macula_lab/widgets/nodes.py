"""Node controls: stop, kill or add a node of a lab running in this process, with confirmation.

    panel = NodesPanel(lab)
    panel.node.value = "node-3"
    panel.kill_button.click()          # asks first: "kill node-3?"
    panel.confirm_button.click(); await panel.last_task

*stop* is a graceful shutdown, *kill* an abrupt one (no goodbye: peers find out by
timing out, as after a crashed host); either way the node's DHT records live on
until their TTL.  Both ask for confirmation, since neither can be undone (a new
node can be added, under a new name).  An attached lab's nodes belong to their
orchestrator: the controls are disabled there, and say so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ipywidgets as w

from ._base import LabView

if TYPE_CHECKING:
    from ..lab.lab import Lab


class NodesPanel(LabView):
    """A node dropdown (running nodes), stop / kill with a confirmation row, and add node."""

    css_class = "macula-nodes"

    def __init__(self, lab: Lab):
        super().__init__(lab)
        names = [n.name for n in lab.running_nodes()]
        self.node = w.Dropdown(options=names, value=names[-1] if names else None, description="node")
        self.stop_button = w.Button(description="stop", icon="stop", tooltip="graceful shutdown")
        self.kill_button = w.Button(description="kill", icon="bolt", button_style="danger",
                                    tooltip="abrupt: no goodbye, peers time out")  # fmt: skip
        self.add_button = w.Button(description="add node", icon="plus")
        for b, cls in ((self.stop_button, "stop"), (self.kill_button, "kill"), (self.add_button, "add")):
            b.add_class(f"macula-nodes-{cls}")
        self.question = w.HTML()
        self.confirm_button = w.Button(description="yes", button_style="danger")
        self.confirm_button.add_class("macula-nodes-confirm")
        self.cancel_button = w.Button(description="cancel")
        self.confirm_row = w.HBox([self.question, self.confirm_button, self.cancel_button])
        self.confirm_row.layout.display = "none"
        self._pending: tuple[str, str] | None = None  # (action, node) awaiting confirmation
        self.stop_button.on_click(lambda _b: self.ask("stop"))
        self.kill_button.on_click(lambda _b: self.ask("kill"))
        self.add_button.on_click(lambda _b: self.add())
        self.confirm_button.on_click(lambda _b: self.confirm())
        self.cancel_button.on_click(lambda _b: self.cancel())
        local = lab.mode == "local"
        for b in (self.stop_button, self.kill_button, self.add_button):
            b.disabled = not local
        note = (
            []
            if local
            else [w.HTML("<i>attached lab: its nodes are managed by their orchestrator (compose, kubectl, systemd)</i>")]
        )
        self.children = [
            w.HTML("<b>Nodes</b>"),
            w.HBox([self.node, self.stop_button, self.kill_button, self.add_button]),
            self.confirm_row,
            *note,
            self.status,
        ]

    # ------------------------------------------------------------ actions
    def ask(self, action: str) -> None:
        """Show the confirmation row for ``action`` ("stop" or "kill") on the chosen node."""
        name = self.node.value
        if not name:
            self.fail(action, ValueError("no running node to " + action))
            return
        self._pending = (action, name)
        what = "stop (graceful)" if action == "stop" else "kill (abrupt, no goodbye)"
        self.question.value = f"<b>{what} {name}?</b> "
        self.confirm_row.layout.display = "flex"

    def cancel(self) -> None:
        self._pending = None
        self.confirm_row.layout.display = "none"
        self.set_status("cancelled")

    def confirm(self):
        """Carry out the confirmed action (returns its task)."""
        if self._pending is None:
            return None
        action, name = self._pending
        self._pending = None
        self.confirm_row.layout.display = "none"
        act = self.lab.kill_node if action == "kill" else self.lab.stop_node

        async def go() -> str:
            await act(name)
            await self.lab.sample()  # every view greys it now, not at the next pass
            return name

        done = {"stop": "stopped", "kill": "killed"}[action]
        return self.run(
            go, f"{action} {name}", lambda n: self.set_status(f"{n} {done}"), buttons=(self.stop_button, self.kill_button)
        )

    def add(self):
        async def go() -> str:
            handle = await self.lab.add_node()
            await self.lab.sample()
            return handle.name

        return self.run(go, "add node", lambda n: self.set_status(f"{n} joined"), buttons=(self.add_button,))

    def refresh(self) -> None:
        self._sync_node_options(self.node)
