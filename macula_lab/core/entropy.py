"""Where random bytes come from: the OS, or a seeded generator for a reproducible simulation.

Request ids, node ids and refresh targets draw from here.  A simulation runs its
event loop in one thread and installs a ``random.Random(seed)`` for that thread
(:func:`use`), so everything its nodes draw follows from the seed while labs in
other threads (the kernel's, a QUIC node's) keep drawing from ``os.urandom``.
"""

from __future__ import annotations

import os
import random
import threading

_local = threading.local()


def use(rng: random.Random | None) -> None:
    """Draw from ``rng`` in this thread from now on (``None``: the OS again)."""
    _local.rng = rng


def current() -> random.Random | None:
    return getattr(_local, "rng", None)


def randbytes(n: int) -> bytes:
    rng = getattr(_local, "rng", None)
    return os.urandom(n) if rng is None else rng.randbytes(n)


def new_rng() -> random.Random:
    """A generator for a part that needs its own (selection, jitter): seeded from this thread's source."""
    return random.Random(int.from_bytes(randbytes(8), "big"))
