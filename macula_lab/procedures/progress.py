"""Progress of a long procedure: which step, how many left, in the notebook and in the terminal.

Plain ``print`` lines (``[step 2/5] Service Discovery ...``): they show in the
notebook cell, in papermill's ``--log-output`` stream (what ``macula-lab
procedure`` and ``make demo`` print) and in the HTML report, which a widget
bar would not.  Waits also print what they wait for (``waiting for
re-advertisement 1/2 on node-1, next fire in 1.3s``).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, *, title: str = "", stream: TextIO | None = None, enabled: bool = True):
        self.total = total
        self.title = title
        self.done = 0
        self.current = ""
        self.stream = stream
        self.enabled = enabled
        self.t0 = time.perf_counter()

    @classmethod
    def null(cls) -> Progress:
        return cls(0, enabled=False)

    def _print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream or sys.stdout, flush=True)

    def step(self, name: str) -> None:
        """Start step ``name`` (the previous one is done)."""
        if self.current:
            self.done += 1
        self.current = name
        left = self.total - self.done - 1
        self._print(
            f"[step {self.done + 1}/{self.total}] {name} ({left} left, {time.perf_counter() - self.t0:.1f}s elapsed)"
        )

    def note(self, text: str) -> None:
        self._print(f"    {text}")

    def finish(self) -> None:
        if self.current:
            self.done += 1
            self.current = ""
        self._print(f"[done {self.done}/{self.total}] {self.title} in {time.perf_counter() - self.t0:.1f}s")
