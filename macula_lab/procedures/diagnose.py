"""Which of the testing guide's Troubleshooting cases applies to a lab, and what to do about it.

    d = await diagnose(lab, service="test.calculator")
    d                      # a table: each case, whether it applies, the evidence, the fix
    d.verdict              # "healthy", or the first case that applies

Cases (the testing guide's, mapped onto this mesh):

- **Wrong realm**: a node (or an endpoint given to probe) serves another realm.
- **Nodes unreachable over UDP**: QUIC is UDP; a node cannot ping another, a
  probed endpoint does not complete the handshake, or a node's routing table
  lacks the other lab nodes.
- **DHT not available**: a node is not ready, has no DHT contact in a mesh of
  several nodes, or a publication reached no replica.
- **Service never advertised**: no node advertises it, stores it, or ever
  published it (similar names are suggested).
- **Service not yet propagated**: it is advertised and stored somewhere, but a
  lookup from the consumer does not find it yet (just published, or the DHT is
  partitioned).
- **No providers: TTL lapsed**: it was published, but the records expired:
  a re-advertisement timer that does not fire, or a provider that went away
  without unadvertising.

Gathering (async, over the lab's inspection API) and judging (:func:`classify`,
a pure function of the gathered facts) are separate, so the rules are tested
without a network.
"""

from __future__ import annotations

import asyncio
import difflib
import html
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConnectFailed, ConnectTimeout, MaculaError, RealmMismatch

if TYPE_CHECKING:
    from ..lab.lab import Lab

CASES = (
    "Wrong realm",
    "Nodes unreachable over UDP",
    "DHT not available",
    "Service never advertised",
    "Service not yet propagated",
    "No providers: TTL lapsed",
)
FIXES = {
    "Wrong realm": "Use one realm everywhere: --realm / MACULA_REALM on every node and the same realm in "
    "Lab.attach(realm=...) or macula_lab.connect(...); realms are compared exactly.",
    "Nodes unreachable over UDP": "QUIC runs over UDP: publish the port as UDP (compose: '9443:9443/udp', k8s: "
    "protocol: UDP), open firewalls/NetworkPolicies for UDP, and set --advertise to an address the other "
    "nodes can reach; then `macula-lab ping quic://host:port --realm R --ca ca.pem` from each side.",
    "DHT not available": "The node has no DHT contacts: give it --bootstrap / MACULA_BOOTSTRAP pointing at a "
    "reachable running node, check its log for the ready line (contacts=N > 0) and its /ready endpoint.",
    "Service never advertised": "Advertise it (lab.node(name).advertise(service, handler, ttl=...), or "
    "--serve NAME=KIND on a node); check the spelling of the name and the realm.",
    "Service not yet propagated": "Wait a few seconds after advertise and look again; check the provider's "
    "'published ... replicas=N' event (N > 0); if it persists the DHT is partitioned: verify every node "
    "is connected in the same realm (routing tables) and reachable over UDP.",
    "No providers: TTL lapsed": "Check the re-advertisement timer is firing (inspect(['advertisements']): "
    "count grows, next_fire_in > 0), use a TTL comfortably above the re-advertisement interval "
    "(> 60 s in production), and confirm the service is still advertised on its provider.",
}


@dataclass
class Finding:
    case: str
    applies: bool
    evidence: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Diagnosis:
    service: str | None
    findings: list[Finding]
    facts: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def applicable(self) -> list[Finding]:
        return [f for f in self.findings if f.applies]

    @property
    def verdict(self) -> str:
        return self.applicable[0].case if self.applicable else "healthy"

    @property
    def healthy(self) -> bool:
        return not self.applicable

    def text(self) -> str:
        head = f"diagnosis{f' of {self.service}' if self.service else ''}: {self.verdict}"
        lines = [head]
        for f in self.findings:
            lines.append(f"  [{'!' if f.applies else ' '}] {f.case}: {f.evidence}")
            if f.applies:
                lines.append(f"      what to do: {f.fix}")
        return "\n".join(lines)

    __str__ = text

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td style='color:{'#cf222e' if f.applies else '#1a7f37'};font-weight:bold'>"
            f"{'applies' if f.applies else 'no'}</td><td style='text-align:left'>{html.escape(f.case)}</td>"
            f"<td style='text-align:left'>{html.escape(f.evidence)}</td>"
            f"<td style='text-align:left'>{html.escape(f.fix) if f.applies else ''}</td></tr>"
            for f in self.findings
        )
        return (
            f"<div class='macula-diagnosis'><p><strong>Diagnosis</strong>"
            f"{' of <code>' + html.escape(self.service) + '</code>' if self.service else ''}: "
            f"<strong>{html.escape(self.verdict)}</strong></p><table><thead><tr><th></th><th>case</th>"
            f"<th>evidence</th><th>what to do</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "verdict": self.verdict,
            "findings": [f.to_dict() for f in self.findings],
        }


# ------------------------------------------------------------------ gather
async def gather_facts(
    lab: Lab,
    service: str | None = None,
    *,
    consumer: str | None = None,
    endpoints: list[str] | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    timeout: float = 2.0,
) -> dict[str, Any]:
    """What the rules look at: per node state, reachability, and the service's traces."""
    facts: dict[str, Any] = {
        "realm": lab.realm,
        "nodes": {},
        "unreachable": [],
        "realm_mismatch": [],
        "inspect_refused": [],
        "now": time.time(),
    }
    running = lab.running_nodes()
    for n in running:
        try:
            snap = await asyncio.wait_for(
                n.inspect(["node", "advertisements", "records", "routing", "events"]), 10
            )
        except MaculaError as exc:
            facts["inspect_refused"].append(f"{n.name}: {type(exc).__name__}: {exc}")
            continue
        except TimeoutError:
            facts["unreachable"].append(f"{n.name}: inspection timed out")
            continue
        facts["nodes"][n.name] = {
            "realm": snap["node"].get("realm"),
            "ready": snap["node"].get("ready", True),
            "contacts": sorted(
                {c.get("name") or c.get("node_id", "")[:12] for c in snap.get("routing") or []}
            ),
            "advertisements": snap.get("advertisements") or [],
            "records": snap.get("records") or [],
            "events": snap.get("events") or [],
        }
    # node-to-node pings for nodes in this process; a handshake from here for given endpoints
    local = [n for n in running if n.is_local and lab.transport == "quic"]
    for a in local:
        for b in local:
            if a is not b:
                try:
                    await a.node.ping(b.endpoint, timeout=timeout)
                except MaculaError as exc:
                    facts["unreachable"].append(f"{a.name} -> {b.name} ({b.endpoint}): {type(exc).__name__}")
    for url in endpoints or []:
        await _probe(facts, url, lab.realm, ca, timeout, cert=cert, key=key)
    for err in list(lab.errors):
        if "RealmMismatch" in err["error"]:
            facts["realm_mismatch"].append(f"lab error in {err['where']}: {err['error']}")
    if service:
        facts["service"] = service
        who = consumer or (running[1].name if len(running) > 1 else running[0].name if running else None)
        facts["consumer"] = who
        if who is not None:
            try:
                entries = await lab.node(who).discover(service, refresh=True)
                facts["found"] = sorted(str(e.metadata.get("node") or e.node_id.hex()[:12]) for e in entries)
            except MaculaError as exc:
                facts["found"] = []
                facts["lookup_error"] = f"{type(exc).__name__}: {exc}"
    return facts


async def _probe(
    facts: dict[str, Any], url: str, realm: str, ca: str | None, timeout: float, *, cert=None, key=None
) -> None:
    from ..lab.client import connect

    try:
        client = await connect(
            url, realm=realm, ca=ca, cert=cert or None, key=key or None, insecure=ca is None, timeout=timeout,
            name="diagnose",
        )  # fmt: skip
    except RealmMismatch as exc:
        facts["realm_mismatch"].append(f"{url} serves realm {exc.theirs!r}, the lab uses {realm!r}: {exc}")
    except (ConnectTimeout, TimeoutError) as exc:
        facts["unreachable"].append(f"{url}: no QUIC handshake within {timeout:g}s ({type(exc).__name__})")
    except ConnectFailed as exc:
        facts["unreachable"].append(f"{url}: {type(exc).__name__}: {exc}")
    else:
        await client.close()


# ------------------------------------------------------------------- judge
def classify(facts: dict[str, Any]) -> list[Finding]:
    """One finding per case (see the module docstring), from :func:`gather_facts`' output."""
    nodes: dict[str, dict[str, Any]] = facts.get("nodes", {})
    names = sorted(nodes)
    realm = facts.get("realm")
    out: list[Finding] = []

    wrong = [
        f"{n} serves realm {d['realm']!r}" for n, d in nodes.items() if d.get("realm") not in (None, realm)
    ]
    wrong += facts.get("realm_mismatch", [])
    out.append(_f("Wrong realm", bool(wrong), "; ".join(wrong) or f"every node serves {realm!r}"))

    unreachable = list(facts.get("unreachable", []))
    if len(names) > 1:
        for n, d in nodes.items():
            missing = [m for m in names if m != n and m not in d["contacts"]]
            if missing and d["contacts"]:
                unreachable.append(f"{n}'s routing table lacks {missing}")
    out.append(
        _f(
            "Nodes unreachable over UDP",
            bool(unreachable),
            "; ".join(unreachable) or f"{len(names)} node(s) reach each other",
        )
    )

    dht = [f"{n} is not ready" for n, d in nodes.items() if not d.get("ready", True)]
    if len(names) > 1:
        dht += [f"{n} has no DHT contact" for n, d in nodes.items() if not d["contacts"]]
    dht += [
        f"{n}: publication of {a['service']} reached no replica ({a.get('failures', 0)} failure(s))"
        for n, d in nodes.items()
        for a in d["advertisements"]
        if a.get("replicas", 1) == 0
    ]
    out.append(_f("DHT not available", bool(dht), "; ".join(dht) or "every node is ready with DHT contacts"))

    service = facts.get("service")
    if not service:
        return out
    found = facts.get("found", [])
    now = facts.get("now", time.time())
    advertisers = {n: a for n, d in nodes.items() for a in d["advertisements"] if a["service"] == service}
    holders = {
        n: [r for r in d["records"] if r["metadata"].get("service") == service] for n, d in nodes.items()
    }
    holders = {n: rows for n, rows in holders.items() if rows}
    events = [e for d in nodes.values() for e in d["events"] if e["service"] == service]
    published = [e for e in events if e["kind"] in ("published", "readvertised")]
    unadvertised = [e for e in events if e["kind"] == "unadvertised"]
    lapsed = {n: a for n, a in advertisers.items() if a.get("expires_in", 1) <= 0}
    stored_by = sorted({r["metadata"].get("node", "?") for rows in holders.values() for r in rows})

    never = not advertisers and not holders and not published and not found
    known = {a["service"] for d in nodes.values() for a in d["advertisements"]}
    known |= {r["metadata"].get("service", "") for d in nodes.values() for r in d["records"]}
    close = difflib.get_close_matches(service, sorted(s for s in known if s), n=3)
    out.append(
        _f(
            "Service never advertised",
            never,
            (
                f"no node advertises, stores or published {service}"
                + (f"; similar names: {close}" if close else "")
                if never
                else f"advertised by {sorted(advertisers) or 'no node now'}, records from {stored_by or 'nobody'}"
            ),
        )
    )

    recent = [e for e in published if now - e["at"] < 5.0]
    live_advertisers = sorted(set(advertisers) - set(lapsed))
    not_found = [p for p in live_advertisers if p not in found]
    propagating = bool(not_found) and (bool(holders) or bool(recent))
    out.append(
        _f(
            "Service not yet propagated",
            propagating,
            (
                f"advertised by {not_found} but the lookup from {facts.get('consumer')} finds {found or 'nothing'}"
                + (f"; records held by {sorted(holders)}" if holders else "")
                + (f"; last publication {now - recent[-1]['at']:.1f}s ago" if recent else "")
                if propagating
                else f"the lookup from {facts.get('consumer')} finds {found or 'nothing'}"
            ),
        )
    )

    gone_silently = bool(published) and not advertisers and not holders and not unadvertised and not found
    ttl_lapsed = bool(lapsed) or gone_silently
    if lapsed:
        evidence = "; ".join(
            f"{n}: advertised, but its last publication expired (timer count {a.get('count')}, "
            f"next fire {a.get('next_fire_in', 0):.2f}s, ttl {a.get('ttl')}s): the timer is not firing"
            for n, a in lapsed.items()
        )
    elif gone_silently:
        evidence = f"{service} was published ({len(published)} time(s)) but no record is left and no provider unadvertised it"
    elif unadvertised and not advertisers:
        evidence = (
            f"{service} was unadvertised by {sorted({e['node'] for e in unadvertised})} (not a TTL lapse)"
        )
    else:
        evidence = "records are live" if found else "no expired publication seen"
    out.append(_f("No providers: TTL lapsed", ttl_lapsed, evidence))
    return out


def _f(case: str, applies: bool, evidence: str) -> Finding:
    return Finding(case, applies, evidence, FIXES[case])


async def diagnose(
    lab: Lab,
    service: str | None = None,
    *,
    consumer: str | None = None,
    endpoints: list[str] | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    timeout: float = 2.0,
) -> Diagnosis:
    """Check the Troubleshooting cases against ``lab`` (and ``endpoints`` to probe); see the module docstring.

    Probes present ``cert``/``key`` (default: ``lab.pem``/``lab.key`` beside ``ca``), as the lab does.
    """
    facts = await gather_facts(
        lab, service, consumer=consumer, endpoints=endpoints, ca=ca, cert=cert, key=key, timeout=timeout
    )
    findings = classify(facts)
    if facts["inspect_refused"]:
        findings.append(
            Finding(
                "Inspection refused",
                True,
                "; ".join(facts["inspect_refused"]),
                "Attach with the nodes' admin token (Lab.attach(..., token=...), MACULA_ADMIN_TOKEN).",
            )
        )
    return Diagnosis(service, findings, facts)
