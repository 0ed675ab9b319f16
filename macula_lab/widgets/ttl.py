"""TTL watch: every node's advertisements and the provider records it stores, counting down.

Two live tables, redrawn after every sampling pass and, between passes, by a
local ticker (``tick`` seconds) that counts down from the latest snapshot:

- advertisements: node, service, TTL, time to expiry (bar), next re-advertisement
  (bar filling up to the fire time), re-advertisements so far, lateness;
- records: the node holding it, service, provider, remaining TTL (bar).

Countdowns use this process's monotonic clock from the moment a snapshot
arrived, so an attached lab with a skewed wall clock counts down correctly.
``watch.advertisement_rows()`` and ``watch.record_rows()`` give the same data
as lists of dicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from typing import TYPE_CHECKING, Any

import ipywidgets as w

from ._base import LabView

if TYPE_CHECKING:
    from ..lab.lab import Lab

_TABLE_STYLE = "border-collapse:collapse;font-size:90%;width:100%"
_CELL = "padding:1px 6px;border-bottom:1px solid #eee;text-align:left"


class TTLWatch(LabView):
    """Live tables of advertisements (with re-advertisement timers) and stored records."""

    css_class = "macula-ttl"

    def __init__(self, lab: Lab, *, tick: float | None = 0.5, max_records: int = 200):
        super().__init__(lab)
        self.tick = tick
        self.max_records = max_records
        self.ads_view = w.HTML()
        self.ads_view.add_class("macula-ttl-ads")
        self.records_view = w.HTML()
        self.records_view.add_class("macula-ttl-records")
        self._seen: dict[str, tuple[float, float]] = {}  # node -> (its snapshot's time, monotonic arrival)
        self.children = [
            w.HTML("<b>Advertisements</b> (every node's services and their re-advertisement timers)"),
            self.ads_view,
            w.HTML("<b>Stored provider records</b> (what each node holds for the DHT, remaining TTL)"),
            self.records_view,
            self.status,
        ]
        self._ticker: Any = None
        self.refresh()
        if tick:
            self._ticker = self._spawn(self._tick_loop(), "widget:ttl-ticker")

    async def _tick_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.tick)
            self.render()

    # ------------------------------------------------------------ data
    def _elapsed(self, node: str, snap: dict[str, Any], now: float) -> float:
        seen = self._seen.get(node)
        stamp = snap.get("time", 0.0)
        if seen is None or seen[0] != stamp:
            seen = self._seen[node] = (stamp, now)
        return now - seen[1]

    def _snapshots(self) -> list[tuple[str, dict[str, Any], float]]:
        now = time.monotonic()
        return [
            (name, snap, self._elapsed(name, snap, now)) for name, snap in list(self.lab.snapshots.items())
        ]

    def advertisement_rows(self) -> list[dict[str, Any]]:
        rows = []
        for node, snap, dt in self._snapshots():
            # a stopped node's last snapshot: its record still counts down, but no timer runs
            running = self.running(node)
            for ad in snap.get("advertisements") or []:
                rows.append(
                    {
                        "node": node,
                        "running": running,
                        "service": ad["service"],
                        "ttl": ad["ttl"],
                        "interval": ad["interval"],
                        "expires_in": max(0.0, ad["expires_in"] - dt),
                        "next_fire_in": max(0.0, ad["next_fire_in"] - dt) if running else None,
                        "count": ad["count"],
                        "lateness_ms": None if ad["lateness_last"] is None else ad["lateness_last"] * 1000.0,
                        "replicas": ad.get("replicas"),
                    }
                )
        return sorted(rows, key=lambda r: (r["service"], r["node"]))

    def record_rows(self) -> list[dict[str, Any]]:
        rows = []
        for node, snap, dt in self._snapshots():
            if not self.running(node):  # what a stopped node held is gone with it
                continue
            for rec in snap.get("records") or []:
                meta = rec.get("metadata") or {}
                provider = meta.get("node") or rec["provider"][:12]
                if meta.get("client"):
                    provider = f"{provider} (client {meta['client']})"
                rows.append(
                    {
                        "holder": node,
                        "service": meta.get("service", rec["key"][:12]),
                        "provider": provider,
                        "ttl": rec["ttl"],
                        "remaining": max(0.0, rec["remaining"] - dt),
                    }
                )
        rows = [r for r in rows if r["remaining"] > 0]
        return sorted(rows, key=lambda r: (r["service"], r["provider"], r["holder"]))

    # ------------------------------------------------------------ drawing
    def refresh(self) -> None:
        self.render()

    def render(self) -> None:
        if self._closed:
            return
        ads = self.advertisement_rows()
        if ads:
            body = "".join(_ad_row(r) for r in ads)
            self.ads_view.value = _table(
                ("node", "service", "TTL", "expires in", "next re-advertisement", "re-ads", "lateness"), body
            )
        else:
            self.ads_view.value = "<i>no advertisements yet</i>"
        recs = self.record_rows()
        if recs:
            shown = recs[: self.max_records]
            body = "".join(
                _tr(
                    r["holder"],
                    r["service"],
                    r["provider"],
                    _bar(r["remaining"], r["ttl"], "#ff7f0e", f"{r['remaining']:.1f} / {r['ttl']:g} s"),
                )
                for r in shown
            )
            more = f"<div><i>{len(recs) - len(shown)} more</i></div>" if len(recs) > len(shown) else ""
            self.records_view.value = _table(("held by", "service", "provider", "remaining TTL"), body) + more
        else:
            self.records_view.value = "<i>no stored records yet</i>"

    def close(self) -> None:
        if self._ticker is not None:
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                self._ticker.cancel()
        super().close()


def _ad_row(r: dict[str, Any]) -> str:
    left = f"{r['expires_in']:.1f} s" if r["expires_in"] > 0 else "expired"
    if not r["running"]:  # greyed: the node is gone, its last record runs out and nothing renews it
        return _tr(
            r["node"] + " (stopped)",
            r["service"],
            f"{r['ttl']:g} s",
            _bar(r["expires_in"], r["ttl"], "#bbb", left),
            "— node stopped: not re-advertised",
            str(r["count"]),
            "—",
            style="color:#999",
        )
    return _tr(
        r["node"],
        r["service"],
        f"{r['ttl']:g} s",
        _bar(r["expires_in"], r["ttl"], "#2ca02c", left),
        _bar(r["interval"] - r["next_fire_in"], r["interval"], "#1f77b4", f"in {r['next_fire_in']:.1f} s"),
        str(r["count"]),
        "—" if r["lateness_ms"] is None else f"{r['lateness_ms']:.1f} ms",
    )


class _Raw(str):
    """HTML made here (a bar), as opposed to text from the nodes, which is escaped."""


def _bar(value: float, full: float, colour: str, text: str) -> _Raw:
    pct = 0.0 if full <= 0 else max(0.0, min(100.0, 100.0 * value / full))
    return _Raw(
        "<div style='position:relative;min-width:120px;height:1.2em;background:#f0f0f0;border-radius:2px'>"
        f"<div class='macula-bar' style='width:{pct:.1f}%;height:100%;background:{colour};opacity:.55'></div>"
        f"<span style='position:absolute;left:4px;top:0;font-size:90%'>{html.escape(text)}</span></div>"
    )


def _tr(*cells: str, style: str = "") -> str:
    return f"<tr class='macula-ttl-row' style='{style}'>" + "".join(f"<td style='{_CELL}'>{_cell(c)}</td>" for c in cells) + "</tr>"


def _cell(c: str) -> str:
    return c if isinstance(c, _Raw) else html.escape(c)


def _table(head: tuple[str, ...], body: str) -> str:
    th = "".join(f"<th style='{_CELL}'>{html.escape(h)}</th>" for h in head)
    return f"<table style='{_TABLE_STYLE}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"
