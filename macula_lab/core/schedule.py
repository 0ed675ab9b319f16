"""Re-advertisement schedule: when a provider republishes its entry, and how late it was.

A provider entry lives ``ttl`` seconds on every storing node, so the provider
must republish it before then.  The reference refreshed after
``max(10, ttl - 60)`` seconds: 240 s for the default 300 s TTL, but 10 s for a
6 s TTL, i.e. only after the record had already expired.  Here the interval is
a fixed fraction of the TTL (0.8: 300 s -> 240 s as in the reference, 6 s ->
4.8 s), so a scaled-down TTL keeps the same safety margin.

Sans-I/O: :class:`ReadvertiseTimer` only does arithmetic on the ``now`` it is
given; the runtime owns the real timer (``loop.call_at``/a task) and asks
:meth:`ReadvertiseTimer.delay` how long to wait, then reports
:meth:`ReadvertiseTimer.fired` after publishing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .params import READVERTISE_FRACTION, check_readvertise_fraction, check_ttl

#: how many recent lateness values a timer keeps (bounded memory for long runs)
LATENESS_WINDOW = 100


def readvertise_interval(ttl: float, fraction: float = READVERTISE_FRACTION) -> float:
    """Seconds between two publications of an entry with this TTL (``ttl * 0.8`` by default); both are checked."""
    return check_ttl(ttl) * check_readvertise_fraction(fraction)


@dataclass
class ReadvertiseTimer:
    """The re-advertisement schedule of one service (times on the node's clock)."""

    service: str
    ttl: float
    interval: float
    created_at: float
    next_fire: float
    last_fire: float | None = None
    count: int = 0
    #: when the entry was last published (start, fire or reschedule); None: unknown
    published_at: float | None = None
    #: lateness (actual - scheduled fire time, s) of the last LATENESS_WINDOW fires
    lateness: deque[float] = field(default_factory=lambda: deque(maxlen=LATENESS_WINDOW), repr=False)
    lateness_total: float = 0.0
    lateness_max: float | None = None
    #: the interval as a fraction of the TTL (kept so that a new TTL keeps the node's setting)
    fraction: float = READVERTISE_FRACTION

    @classmethod
    def start(cls, service: str, ttl: float, now: float, fraction: float = READVERTISE_FRACTION) -> ReadvertiseTimer:
        """A timer for an entry published at ``now``: first fire at ``now + interval``."""
        interval = readvertise_interval(ttl, fraction)
        return cls(
            service=service,
            ttl=float(ttl),
            interval=interval,
            created_at=now,
            next_fire=now + interval,
            published_at=now,
            fraction=float(fraction),
        )

    def delay(self, now: float) -> float:
        """Seconds to wait before the next fire (0 if it is due or overdue)."""
        return max(0.0, self.next_fire - now)

    def due(self, now: float) -> bool:
        return now >= self.next_fire

    def fired(self, now: float) -> float:
        """Record a fire (the entry republished at ``now``); returns its lateness in seconds.

        Lateness is ``now - next_fire``: positive when late (a busy loop, a
        suspended laptop), negative when fired early; both are kept.
        """
        late = now - self.next_fire
        self.lateness.append(late)
        self.lateness_total += late
        self.lateness_max = late if self.lateness_max is None else max(self.lateness_max, late)
        self.last_fire = now
        self.published_at = now
        self.count += 1
        # Schedule from the actual fire, not from the planned time: the record
        # stored at ``now`` lives until ``now + ttl``, so ``now + interval`` keeps
        # the full margin before expiry.  Scheduling from the planned time would
        # shorten the next gap after a late fire (and burst catch-up fires after
        # a long stall) without making the record live any longer.
        self.next_fire = now + self.interval
        return late

    def reschedule(self, ttl: float, now: float) -> None:
        """The service was advertised again at ``now`` with ``ttl``: restart the cycle.

        ``count`` and the lateness history are kept: it is the same service's timer.
        """
        self.interval = readvertise_interval(ttl, self.fraction)
        self.ttl = float(ttl)
        self.published_at = now
        self.next_fire = now + self.interval

    def expires_in(self, now: float) -> float:
        """Seconds before the last published entry expires (0 once it has)."""
        published = self.published_at
        if published is None:
            published = self.last_fire if self.last_fire is not None else self.created_at
        return max(0.0, published + self.ttl - now)

    def snapshot(self, now: float) -> dict[str, Any]:
        """A row for the lab views (all durations in seconds)."""
        return {
            "service": self.service,
            "ttl": self.ttl,
            "interval": self.interval,
            "next_fire_in": self.delay(now),
            "last_fire_ago": None if self.last_fire is None else now - self.last_fire,
            "count": self.count,
            "lateness_last": self.lateness[-1] if self.lateness else None,
            "lateness_mean": self.lateness_total / self.count if self.count and self.lateness else None,
            "lateness_max": self.lateness_max,
            "expires_in": self.expires_in(now),
        }
