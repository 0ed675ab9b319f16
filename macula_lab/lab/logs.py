"""``lab.events`` and ``lab.errors``: bounded logs that slice like lists and show as tables.

A plain deque refuses slices (``lab.events[-8:]`` raised TypeError), which is
the first thing a notebook user types; its repr is a wall of dicts with epoch
floats.  :class:`RowLog` keeps the deque's bound and O(1) appends, returns a
:class:`RowLog` for a slice (so the slice also shows as a table) and renders
times as wall-clock ``HH:MM:SS.mmm``.
"""

from __future__ import annotations

import html
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, overload

#: rows shown by the reprs: the newest ones (a 5000-row table would freeze the browser)
SHOWN = 50


def clock(at: Any) -> str:
    """Epoch seconds as local ``HH:MM:SS.mmm``; anything else as given."""
    if isinstance(at, int | float) and not isinstance(at, bool):
        return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"
    return "" if at is None else str(at)


class RowLog(deque):
    """A bounded deque of dict rows (see the module docstring)."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), maxlen: int | None = None, *, columns: Sequence[str] = (), title: str = "rows"):
        super().__init__(rows, maxlen)
        self.columns = tuple(columns)
        self.title = title

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> RowLog: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return RowLog(list(self)[index], columns=self.columns, title=self.title)
        return super().__getitem__(index)

    def __copy__(self) -> RowLog:
        return RowLog(self, self.maxlen, columns=self.columns, title=self.title)

    def __reduce__(self):
        return (RowLog, (list(self), self.maxlen), {"columns": self.columns, "title": self.title})

    def _cols(self) -> list[str]:
        cols = list(self.columns)
        for row in self:
            cols += [k for k in row if k not in cols]
        return cols

    def _shown(self) -> list[dict[str, Any]]:
        return list(self)[-SHOWN:]

    def _cell(self, key: str, value: Any) -> str:
        return clock(value) if key == "at" else ("" if value is None else str(value))

    def __repr__(self) -> str:
        if not self:
            return f"<{self.title}: none>"
        cols = self._cols()
        rows = [[self._cell(c, r.get(c)) for c in cols] for r in self._shown()]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        lines = [f"<{self.title}: {len(self)}{f', newest {len(rows)} shown' if len(rows) < len(self) else ''}>"]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        if not self:
            return f"<p><em>{html.escape(self.title)}: none</em></p>"
        cols = self._cols()
        shown = self._shown()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(self._cell(c, r.get(c)))}</td>" for c in cols) + "</tr>"
            for r in shown
        )
        more = f", newest {len(shown)} shown" if len(shown) < len(self) else ""
        return (
            f"<div class='macula-log'><strong>{html.escape(self.title)}</strong> ({len(self)}{more})"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
        )
