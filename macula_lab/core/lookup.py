"""Iterative Kademlia lookup as a sans-I/O state machine.

A driver (the asyncio runtime, or a synchronous simulation in a test) runs::

    lookup = Lookup(target, table.closest(target), self_id=me, now=t)
    while not lookup.done:
        for contact in lookup.next_queries(t):       # send FIND_NODE / FIND_VALUE
            ...
        # as events arrive:
        lookup.on_reply(contact.node_id, contacts, t, value=...)   # or
        lookup.on_failure(contact.node_id, t)                       # error / timeout
        for contact in lookup.timed_out(t, per_query_timeout):
            lookup.on_failure(contact.node_id, t)
    result = lookup.result()

Algorithm.  The lookup keeps every candidate it has heard of, sorted by XOR
distance to the target.  The *window* is the k closest candidates that have not
failed.  :meth:`Lookup.next_queries` sends to the closest not-yet-queried
candidates of the window, keeping at most ``alpha`` queries outstanding to
window members.  The lookup is :attr:`~Lookup.done` when every window member has
answered (or none is left, or - in ``find_value`` mode - a value arrived).

Stragglers never stall a lookup: a query whose contact has been pushed out of
the window by closer discoveries no longer counts against ``alpha`` and is not
waited for (its late reply is still merged if it arrives before the end).  Only
a dead contact *inside* the window delays completion, for at most the driver's
per-query timeout, after which the window slides to the next live candidate.

Values.  ``find_value=True`` finishes at the first reply carrying a value.
``collect_values=True`` (for provider records, which every replica may hold a
different subset of) runs to the k closest like a node lookup and gathers the
value of every responder that had one.

Hedged reads.  ``hedged=True`` (reads that stop at the first value) asks only
the closest candidate first: in a warm routing table it is usually a replica,
and one query costs a third of alpha.  Any reply or failure, or the driver's
hedge timer (:meth:`Lookup.widen`, about two round trips), turns it into a
plain alpha-parallel lookup, so a dead closest contact costs one hedge delay.
``more_seeds`` lets such a read start from the closest contact alone and fetch
the other seeds only when it widens: most reads never do, and the k seeds cost
about as much CPU as the rest of the lookup.

Hops.  Seeds are depth 1; a contact first learned from a responder of depth d
has depth d + 1 (the smallest such depth if several responders named it).  The
result's ``hops`` is the depth of the node that ended the search: the first
value holder in ``find_value`` mode, else the closest responder - i.e. the
number of sequential request rounds on the path that found it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from itertools import islice
from typing import Any

from .ids import ID_BYTES, xor_distance
from .routing import Contact

DEFAULT_ALPHA = 3


class _State(Enum):
    NEW = "new"
    IN_FLIGHT = "in_flight"
    ANSWERED = "answered"
    FAILED = "failed"


@dataclass(slots=True)
class _Candidate:
    contact: Contact
    distance: int
    depth: int
    state: _State = _State.NEW
    sent_at: float = 0.0


@dataclass(slots=True)
class LookupResult:
    target: bytes
    closest: list[Contact]  # the k closest nodes that answered, nearest first
    values: dict[bytes, Any] = field(default_factory=dict)  # responder id -> value, in arrival order
    hops: int = 0
    contacted: int = 0  # distinct nodes queried
    failures: int = 0  # queries that failed or timed out
    duration: float = 0.0

    @property
    def value(self) -> Any:
        """The first value received, or None."""
        return next(iter(self.values.values()), None)

    @property
    def found(self) -> bool:
        return bool(self.values)


class Lookup:
    """One iterative FIND_NODE / FIND_VALUE lookup."""

    def __init__(
        self,
        target: bytes,
        seeds: Iterable[Contact],
        *,
        k: int = 20,
        alpha: int = DEFAULT_ALPHA,
        self_id: bytes,
        find_value: bool = False,
        collect_values: bool = False,
        hedged: bool = False,
        more_seeds: Callable[[], Iterable[Contact]] | None = None,
        now: float,
    ) -> None:
        if k < 1 or alpha < 1:
            raise ValueError("k and alpha must be >= 1")
        self.target = target
        self.k = k
        self.alpha = alpha
        self.self_id = self_id
        self.collect_values = collect_values
        self.find_value = find_value or collect_values
        # hedged: ask only the closest candidate first; the driver widens to alpha when it
        # stays silent for a moment (widen()), and any reply or failure widens too
        self.hedging = hedged and not collect_values
        self._parallelism = 1 if self.hedging else alpha
        self.started = now
        self._candidates: dict[bytes, _Candidate] = {}
        # (distance, id, candidate) of every candidate ever seen, nearest first (ids are
        # unique, so the candidate itself is never compared)
        self._order: list[tuple[int, bytes, _Candidate]] = []
        self._more_seeds = more_seeds
        self._values: dict[bytes, Any] = {}
        self._value_holder: bytes | None = None
        self._contacted = 0
        self._failures = 0
        self._finished_at: float | None = None
        self._last_event = now
        for seed in seeds:
            self._learn(seed, depth=1)
        self._check_done(now)

    # ------------------------------------------------------------- driving
    def next_queries(self, now: float) -> list[Contact]:
        """Contacts to query now; each is marked in flight until replied or failed."""
        if self.done:
            return []
        window = self._window()
        slots = self._parallelism - sum(1 for c in window if c.state is _State.IN_FLIGHT)
        out: list[Contact] = []
        for cand in window:
            if slots <= 0:
                break
            if cand.state is _State.NEW:
                cand.state = _State.IN_FLIGHT
                cand.sent_at = now
                self._contacted += 1
                slots -= 1
                out.append(cand.contact)
        return out

    def widen(self) -> None:
        """End the hedged start: from now on keep ``alpha`` queries outstanding."""
        if self._finished_at is not None:
            return  # answered already (a hedge timer that comes too late)
        self.hedging = False
        self._parallelism = self.alpha
        more, self._more_seeds = self._more_seeds, None
        if more is not None:
            for seed in more():
                self._learn(seed, depth=1)

    def on_reply(self, contact_id: bytes, contacts: Iterable[Contact], now: float, value: Any = None) -> None:
        """``contact_id`` answered with ``contacts`` (and maybe a value)."""
        cand = self._candidates.get(contact_id)
        if cand is None or cand.state is _State.NEW:
            return  # not something we asked
        if self._finished_at is not None:
            if cand.state is not _State.FAILED:
                return  # too late to matter
            # a peer we gave up on answered after all: resume, its news may be closer
            self._finished_at = None
        if cand.state is _State.FAILED:
            self._failures -= 1  # a late answer after a timeout: it is alive after all
        cand.state = _State.ANSWERED
        self._last_event = now
        if value is not None and self.find_value:
            self._values.setdefault(contact_id, value)
            if self._value_holder is None:
                self._value_holder = contact_id
        if self._value_holder is not None and not self.collect_values:
            self._finished_at = now  # the read is answered: no need for the other seeds (widen())
            return
        self.widen()
        for contact in contacts:
            self._learn(contact, depth=cand.depth + 1)
        self._check_done(now)

    def on_failure(self, contact_id: bytes, now: float) -> None:
        """The query to ``contact_id`` failed or timed out: drop it from the shortlist."""
        cand = self._candidates.get(contact_id)
        if cand is None or cand.state is not _State.IN_FLIGHT or self._finished_at is not None:
            return
        cand.state = _State.FAILED
        self._failures += 1
        self._last_event = now
        self.widen()
        self._check_done(now)

    def timed_out(self, now: float, per_query_timeout: float) -> list[Contact]:
        """In-flight queries sent at least ``per_query_timeout`` ago (call on_failure for each)."""
        return [
            c.contact
            for c in self._candidates.values()
            # the same sum next_deadline() gives the driver's timer: ``now - sent >= timeout`` can be
            # false at exactly that time (float rounding), and a clock that does not move on
            # between wake-ups (a virtual one) would then wake the lookup again and again
            if c.state is _State.IN_FLIGHT and now >= c.sent_at + per_query_timeout
        ]

    # -------------------------------------------------------------- status
    @property
    def done(self) -> bool:
        return self._finished_at is not None

    @property
    def found(self) -> bool:
        """A value has arrived (``find_value`` mode)."""
        return bool(self._values)

    def in_flight(self) -> list[Contact]:
        """Every outstanding query, stragglers included."""
        return [c.contact for c in self._candidates.values() if c.state is _State.IN_FLIGHT]

    def next_deadline(self, per_query_timeout: float) -> float | None:
        """When the oldest outstanding query times out (for the driver's timer)."""
        sent = [c.sent_at for c in self._candidates.values() if c.state is _State.IN_FLIGHT]
        return min(sent) + per_query_timeout if sent else None

    def result(self, now: float | None = None) -> LookupResult:
        """The outcome so far (final once :attr:`done`)."""
        answered = [c for _, _, c in self._order if c.state is _State.ANSWERED]
        closest = answered[: self.k]
        if self._value_holder is not None and not self.collect_values:
            hops = self._candidates[self._value_holder].depth
        else:
            hops = closest[0].depth if closest else 0
        end = (
            self._finished_at
            if self._finished_at is not None
            else (now if now is not None else self._last_event)
        )
        return LookupResult(
            target=self.target,
            closest=[c.contact for c in closest],
            values=dict(self._values),
            hops=hops,
            contacted=self._contacted,
            failures=self._failures,
            duration=end - self.started,
        )

    # ------------------------------------------------------------ internals
    def _learn(self, contact: Contact, depth: int) -> None:
        nid = contact.node_id
        if nid == self.self_id or not isinstance(nid, bytes) or len(nid) != ID_BYTES:
            return
        known = self._candidates.get(nid)
        if known is not None:
            if known.state is _State.NEW and depth < known.depth:
                known.depth = depth
            return
        distance = xor_distance(nid, self.target)
        cand = self._candidates[nid] = _Candidate(contact, distance, depth)
        order = self._order
        if not order or order[-1][0] < distance:
            order.append((distance, nid, cand))  # seeds come nearest first: no search
        else:
            bisect.insort(order, (distance, nid, cand))

    def _window(self) -> list[_Candidate]:
        """The k closest candidates that have not failed, nearest first."""
        failed = _State.FAILED
        return list(islice((c for _, _, c in self._order if c.state is not failed), self.k))

    def _check_done(self, now: float) -> None:
        if self._finished_at is not None:
            return
        if self._value_holder is not None and not self.collect_values:
            self._finished_at = now
            return
        if all(c.state is _State.ANSWERED for c in self._window()):  # also true for no candidates
            self._finished_at = now
