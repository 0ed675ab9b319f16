"""The guide's local multi-node test in the kernel: three nodes, the expected output told by real events.

:func:`start_local_lab` starts node-1..node-n with node ids ordered like their
names, so the ``first`` strategy (lowest node id) picks node-1, as the
reference's consumer did when it printed ``SUCCESS! ... node => <<"node-1">>``.

:func:`expected_output` replays the testing guide's "Expected Output" from what really
happens: every line below ``=== Node N Log ===`` is printed from an event the
node recorded (published, readvertise_scheduled, discovered) or from the
handler's own invocation, and each one is a check in the returned report.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from .report import Check, Report

if TYPE_CHECKING:
    from ..lab.lab import Lab

GROUP = "Expected output"


def ordered_id(index: int, name: str) -> bytes:
    """A node id whose first byte is ``index``: ids sort like node-1 < node-2 < ..."""
    return bytes([index % 256]) + hashlib.sha256(name.encode()).digest()[1:]


async def start_local_lab(n: int = 3, **options: Any) -> Lab:
    """``Lab.start`` with node ids ordered by name (see the module docstring); ``options`` go to Lab.start."""
    from ..lab.lab import Lab

    lab = await Lab.start(n=0, **options)
    try:
        for i in range(1, n + 1):
            await lab.add_node(f"node-{i}", node_id=ordered_id(i, f"node-{i}"))
    except BaseException:
        await lab.stop()
        raise
    return lab


async def expected_output(
    lab: Lab,
    *,
    service: str = "test.calculator",
    ttl: float = 3.0,
    args: dict[str, Any] | None = None,
    providers: tuple[str, str] = ("node-1", "node-3"),
    consumer: str = "node-2",
    strategy: str = "first",
) -> Report:
    """Print the testing guide's expected output from real events; return its checks (then unadvertise)."""
    args = args or {"operation": "add", "a": 10, "b": 5}
    report = Report("expected output", parameters={"service": service, "ttl": ttl, "strategy": strategy})
    since: dict[str, float] = {}

    async def new_events(node: str) -> dict[str, list[dict[str, Any]]]:
        """The node's events about ``service`` since the last look, by kind."""
        snap = await lab.node(node).inspect(["events"], since.get(node, 0.0))
        if snap["events"]:
            since[node] = max(e["at"] for e in snap["events"])
        out: dict[str, list[dict[str, Any]]] = {}
        for e in snap["events"]:
            if e["service"] == service:
                out.setdefault(e["kind"], []).append(e)
        return out

    def number(name: str) -> str:
        return name.split("-")[-1]

    print("=== Multi-Node DHT Service Discovery Test ===\n")
    for handle in lab.nodes:
        snap = await handle.inspect(["node", "routing"])
        print(
            f"Node {number(handle.name)} started: {handle.name} at {handle.endpoint} "
            f"({len(snap['routing'])} DHT contact(s))"
        )
        since[handle.name] = snap["time"]
    print("\nAll nodes started!\n")

    received: list[tuple[str, Any]] = []  # (provider, args) of each handler invocation

    def handler(node: str):
        from ..runtime.handlers import make_handler

        calc = make_handler("calculator", node)

        def handle(call_args: Any) -> Any:
            # printed by the cell below, not here: the handler runs in a task of the
            # node's server, whose output would go to the cell that started the node
            received.append((node, call_args))
            return calc(call_args)

        return handle

    for i, provider in enumerate(providers):
        role = "Provider" if i == 0 else "Second Provider"
        print(f"=== Node {number(provider)} Log ({role}) ===")
        await lab.node(provider).advertise(service, handler(provider), ttl=ttl)
        events = await new_events(provider)
        published = events.get("published", [])
        for e in published:
            print(f"Published service {service} to DHT (stored on {e['detail'].get('replicas')} node(s))")
        print(f"Node {number(provider)} advertised service '{service}'")
        scheduled = events.get("readvertise_scheduled", [])
        for e in scheduled:
            print(f"Scheduled re-advertisement for {service} in {e['detail'].get('next_in_s'):g} seconds")
        report.add(
            Check(
                GROUP,
                f"{provider}: Published service {service} to DHT",
                bool(published) and published[-1]["detail"].get("replicas", 0) >= 1,
                published[-1]["detail"].get("replicas") if published else None,
                "replica(s)",
                "from the provider's 'published' event",
            )
        )
        if i == 0:
            want = round(0.8 * ttl, 3)
            got = scheduled[-1]["detail"].get("next_in_s") if scheduled else None
            report.add(
                Check(
                    GROUP,
                    f"{provider}: Scheduled re-advertisement in 0.8 x TTL",
                    got is not None and abs(got - want) < 0.05 * want,
                    got,
                    "s",
                    f"expected {want:g}s (240 s for a 300 s TTL)",
                )
            )
        print()

    print(f"=== Node {number(consumer)} Log (Consumer) ===")
    print(f"Node {number(consumer)} calling service '{service}' (discovering via DHT)...")
    await lab.node(consumer).discover(service, refresh=True)
    found = (await new_events(consumer)).get("discovered", [])
    count = found[-1]["detail"].get("providers") if found else 0
    print(f"Found {count} providers for service {service} in DHT")
    report.add(
        Check(
            GROUP,
            f"Found {len(providers)} providers for service {service} in DHT",
            count == len(providers),
            count,
            "provider(s)",
            "from the consumer's 'discovered' event",
        )
    )
    res = await lab.node(consumer).call(service, args, strategy=strategy)
    for node, call_args in received:
        print(f"[Node {number(node)} Handler] Received call with args: {call_args}")
    print(f"Node {number(consumer)} SUCCESS! Received: {json.dumps(res.value)}")
    expected = {"result": 15, "node": providers[0]} if args == {"operation": "add", "a": 10, "b": 5} else None
    report.add(
        Check(
            GROUP,
            f"SUCCESS with {json.dumps(expected or res.value)}",
            res.value == expected if expected else True,
            json.dumps(res.value),
            "",
            f"strategy {strategy!r} chose {res.provider} in {res.latency * 1000:.1f} ms",
        )
    )
    for provider in providers:  # the checklist starts from a clean mesh
        await lab.node(provider).unadvertise(service)
    return report.finish()
