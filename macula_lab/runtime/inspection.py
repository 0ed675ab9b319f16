"""The inspection API: what a node shows the lab's views, only to holders of its admin token.

A lab in the kernel reads its own nodes directly; a lab attached to nodes in
containers, pods or on hosts sends them an INSPECT request carrying the lab's
admin token (``--admin-token`` / ``MACULA_ADMIN_TOKEN``).  Both get the same
snapshot from :func:`snapshot`, so the views cannot tell them apart.

Sections (ask for a subset to keep replies small):

- ``node``: name, realm, endpoint, id, uptime;
- ``advertisements``: this node's services with their re-advertisement timers;
- ``records``: the provider records this node stores, with remaining TTL;
- ``routing``: the routing table (contacts per bucket);
- ``cache``: the discovery cache (entries and hit/miss counters);
- ``providers``: provider selection statistics (selected, calls, latency);
- ``metrics``: gauges (sizes, ratios) and the samples taken after ``since``
  (DHT query latency, RPC round trips, re-advertisement lateness);
- ``events``: the service events after ``since`` (published, re-advertised, ...).

A node without an admin token refuses every INSPECT: inspection is opt-in.
"""

from __future__ import annotations

import hmac
import os
import resource
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..core.messages import Frame, MessageType
from ..core.session import PeerInfo
from ..errors import MaculaError

if TYPE_CHECKING:
    from .dht import Dht
    from .host import Host
    from .services import Services

SECTIONS = ("node", "advertisements", "records", "routing", "cache", "providers", "metrics", "events")
MAX_NAMES = 4096  # remembered node names (id -> name); bounded for meshes with much churn
MAX_SAMPLES = 500  # per series per reply: an attached lab polls often, a slow one catches up next time


class Unauthorized(MaculaError):
    """An INSPECT without the node's admin token (or to a node that has none)."""

    code = "unauthorized"


class UnknownSection(MaculaError, ValueError):
    code = "unknown_section"


def check_sections(sections: Any) -> tuple[str, ...]:
    if sections is None:
        return SECTIONS
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise UnknownSection(f"unknown inspection sections {unknown}; known: {list(SECTIONS)}")
    return tuple(sections)


class Inspector:
    """Serves INSPECT on a node: checks the token, answers the snapshot (see the module docstring)."""

    def __init__(
        self,
        host: Host,
        dht: Dht,
        services: Services,
        *,
        status: Callable[[], dict[str, Any]],
        ready: Callable[[], bool],
        token: str | None,
    ):
        self.host = host
        self.dht = dht
        self.services = services
        self._status = status
        self._ready = ready
        self._token = token
        #: names once seen, kept: a dead provider leaves the routing table and its records
        #: expire, but its selection counts stay, and should still read as its name
        self._seen_names: dict[str, str] = {}
        host.route(MessageType.INSPECT, self._on_inspect)

    def _on_inspect(self, frame: Frame, peer: PeerInfo):
        expected = self._token
        if not expected:
            raise Unauthorized(f"node {self.host.name} has no admin token: inspection is disabled")
        if not hmac.compare_digest(frame.body["token"].encode(), expected.encode()):
            raise Unauthorized(f"wrong admin token for node {self.host.name}")
        since = float(frame.body.get("since") or 0.0)
        return MessageType.INSPECT_REPLY, {"snapshot": self.snapshot(frame.body["sections"], since)}

    def snapshot(self, sections: Any = None, since: float = 0.0) -> dict[str, Any]:
        """The requested sections of the node's state (all by default); ``since`` is a wall-clock time."""
        wanted = check_sections(sections)
        out: dict[str, Any] = {"time": self.host.wall_time(), "name": self.host.name}
        services, dht = self.services, self.dht
        now = dht.now()
        if "node" in wanted:
            out["node"] = {
                **self._status(),
                "running": self.host.running,
                "ready": self._ready(),
                "readvertise_timers": services.live_timers(),
            }
        if "advertisements" in wanted:
            out["advertisements"] = services.snapshot()["advertisements"]
        if "records" in wanted:
            out["records"] = dht.records.snapshot(now)
        if "routing" in wanted:
            out["routing"] = dht.table.snapshot(now)
        if "cache" in wanted:
            out["cache"] = {"stats": services.cache.stats(), "entries": services.cache.snapshot(now)}
        if "providers" in wanted:
            out["providers"] = self._providers()
        if "metrics" in wanted:
            out["metrics"] = self._metrics(since)
        if "events" in wanted:
            out["events"] = [
                {"at": e.at, "node": e.node, "kind": e.kind, "service": e.service, "detail": e.detail}
                for e in list(services.events)
                if e.at > since
            ][-MAX_SAMPLES:]
        return out

    def _names(self) -> dict[str, str]:
        """node id (hex) -> name, from what this node has seen (routing table, records, itself)."""
        names = {row["node_id"]: row["name"] for row in self.dht.table.snapshot() if row.get("name")}
        for row in self.dht.records.snapshot(self.dht.now()):
            if row["metadata"].get("node"):
                names.setdefault(row["provider"], row["metadata"]["node"])
        names[self.host.node_id.hex()] = self.host.name
        if len(self._seen_names) > MAX_NAMES:
            self._seen_names.clear()
        self._seen_names.update(names)
        return dict(self._seen_names)

    def _providers(self) -> list[dict[str, Any]]:
        names = self._names()
        now = self.dht.now()
        rows = self.services.stats.snapshot()
        for row in rows:
            row["provider"] = names.get(row["node_id"]) or row["node_id"][:12]
            row["suspect_for"] = round(max(0.0, row["suspect_for"] - now), 3)  # seconds left (0: trusted)
        return rows

    def _metrics(self, since: float) -> dict[str, Any]:
        services, dht = self.services, self.dht
        cache = services.cache.stats()
        providers = services.stats.snapshot()
        gauges = {
            "routing_table_size": len(dht.table),
            "stored_keys": len(dht.records),
            "stored_records": len(dht.records.snapshot(dht.now())),
            "advertised_services": len(services.ads),
            "cache_hits": cache["hits"],
            "cache_misses": cache["misses"],
            "cache_hit_ratio": cache["hit_ratio"],
            "pending_calls": sum(p["in_flight"] for p in providers),
            "successful_calls": services.ok_calls,
            "tasks": len(self.host.tasks),
            "process_rss_bytes": _rss_bytes(),
        }
        samples = {
            series: [[t, v] for t, v in list(values) if t > since][-MAX_SAMPLES:]
            for series, values in services.samples.items()
        }
        return {"gauges": gauges, "samples": samples}


def _rss_bytes() -> int:
    """Current resident memory (Linux /proc), else the peak from getrusage."""
    try:
        with open(f"/proc/{os.getpid()}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
