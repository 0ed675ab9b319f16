"""Services: advertise, re-advertise, discover, call with provider selection and failover.

One :class:`Services` per node (``node.services``; the node's ``advertise``,
``unadvertise``, ``discover`` and ``call`` delegate here).

- **Advertise** stores the handler locally (so CALLs for the name are answered
  here), publishes this node as a provider into the DHT (the k closest nodes to
  ``SHA-256(realm, name)``) and schedules re-advertisement at 80% of the TTL
  (240 s for the default 300 s; the node option ``readvertise_fraction``).
  Advertising again replaces the handler and reschedules: one timer per name,
  always.
- **Unadvertise** cancels the timer, removes this provider's entry on the k
  closest nodes and stops answering calls for the name.
- **Discover** goes through the discovery cache (60 s by default) and falls back
  to a DHT lookup that collects the entries of every replica.  Expired entries
  are never returned.
- **Call** picks a provider with a strategy (random by default), calls it
  directly over the pooled connection, and on a timeout, an unreachable or an
  unavailable provider excludes it, evicts it from the cache and tries the next
  one; when every known provider failed it asks the DHT once more.  The overall
  deadline covers every attempt.  A handler that *raised* is not a provider
  failure: the caller gets :class:`RemoteError` at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core import entropy, params
from ..core.cache import DiscoveryCache
from ..core.ids import service_key
from ..core.messages import MessageType
from ..core.params import DEFAULT_CACHE_TTL, DEFAULT_CALL_TIMEOUT, DEFAULT_MAX_ATTEMPTS, DEFAULT_TTL
from ..core.records import ProviderEntry
from ..core.schedule import ReadvertiseTimer
from ..core.selection import ProviderStats, SelectionContext, Strategy, make_strategy
from ..errors import (
    ConnectFailed,
    HandlerError,
    MaculaError,
    PeerError,
    RealmMismatch,
    RequestTimeout,
    ServiceUnavailable,
    TransportError,
)
from .host import as_procedure

if TYPE_CHECKING:
    from .host import Host
    from .interfaces import Directory

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_TTL",
    "Advertisement",
    "AllProvidersFailed",
    "Attempt",
    "CallResult",
    "CallTimeout",
    "Event",
    "RemoteError",
    "ServiceNotFound",
    "ServiceUnavailable",
    "Services",
]


# ------------------------------------------------------------------ errors
class ServiceNotFound(MaculaError):
    """No live provider of the service is known to the DHT."""

    code = "service_not_found"


class RemoteError(MaculaError):
    """The provider's handler raised.  ``remote_type`` and ``remote_message`` say what."""

    code = "remote_error"

    def __init__(
        self,
        service: str,
        provider: str,
        remote_type: str,
        remote_message: str,
        remote_traceback: str | None = None,
    ):
        super().__init__(f"{service} on {provider} raised {remote_type}: {remote_message}")
        self.service = service
        self.provider = provider
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    @classmethod
    def from_details(
        cls, service: str, provider: str, details: dict[str, Any], fallback: str = ""
    ) -> RemoteError:
        """Rebuild from the ``details`` of a handler_error / remote_error that crossed the wire."""
        return cls(
            details.get("service", service),
            details.get("provider", provider),
            str(details.get("type", "Exception")),
            str(details.get("message", fallback)),
            details.get("traceback"),
        )

    @property
    def details(self) -> dict[str, Any]:
        """Sent along when this error crosses the wire (an attached client rebuilds it)."""
        d = {
            "type": self.remote_type,
            "message": self.remote_message,
            "service": self.service,
            "provider": self.provider,
        }
        if self.remote_traceback:
            d["traceback"] = self.remote_traceback
        return d


@dataclass(frozen=True)
class Attempt:
    """One try of a call: which provider, how long, and why it failed (if it did)."""

    provider: str  # provider name (or short id)
    node_id: str  # hex
    endpoint: str
    duration: float
    error: str | None = None  # "ErrorType: message"


class AllProvidersFailed(MaculaError):
    """Every attempted provider failed; ``attempts`` holds each one's cause."""

    code = "all_providers_failed"

    def __init__(self, service: str, attempts: list[Attempt], reason: str = ""):
        causes = "; ".join(f"{a.provider}: {a.error}" for a in attempts) or "no attempt was possible"
        super().__init__(f"{service}: {reason or f'all {len(attempts)} attempts failed'} ({causes})")
        self.service = service
        self.attempts = attempts

    @property
    def details(self) -> dict[str, Any]:
        return {"service": self.service, "attempts": [a.__dict__ for a in self.attempts]}


class CallTimeout(AllProvidersFailed):
    """The call's overall deadline passed (or every attempt timed out)."""

    code = "call_timeout"


# ----------------------------------------------------------------- records
@dataclass
class Advertisement:
    name: str
    handler: Callable[[Any], Any]
    ttl: float
    metadata: dict[str, Any]
    timer: ReadvertiseTimer
    seq: int
    replicas: int = 0  # nodes that acknowledged the last publication
    task: asyncio.Task | None = None
    failures: int = 0  # publications that reached no node


@dataclass(frozen=True)
class CallResult:
    """A successful call, with what the lab shows about it."""

    service: str
    value: Any
    provider: str
    node_id: str
    endpoint: str
    latency: float  # seconds, whole call (discovery and failover included)
    attempts: tuple[Attempt, ...]
    cache_hit: bool

    @property
    def failed_over(self) -> bool:
        """Whether a provider failed before this one answered."""
        return any(a.error for a in self.attempts)

    def _how(self) -> str:
        how = "cache hit" if self.cache_hit else "looked up in the DHT"
        failed = [a.provider for a in self.attempts if a.error]
        return how + (f", failed over from {', '.join(failed)}" if failed else "")

    def __repr__(self) -> str:  # names, not the 64-hex ids of the dataclass repr
        return (
            f"<CallResult {self.service} answered by {self.provider} in {self.latency * 1000:.2f} ms "
            f"({self._how()}): {self.value!r}>"
        )

    def _repr_html_(self) -> str:
        import html

        rows = "".join(
            f"<tr><td>{html.escape(a.provider)}</td><td>{a.duration * 1000:.2f} ms</td>"
            f"<td>{html.escape(a.error or 'ok')}</td></tr>"
            for a in self.attempts
        )
        return (
            f"<div class='macula-call-result'><b>{html.escape(self.service)}</b> answered by "
            f"<b>{html.escape(self.provider)}</b> <code>{html.escape(self.endpoint)}</code> in "
            f"<b>{self.latency * 1000:.2f} ms</b> ({html.escape(self._how())})"
            f"<pre style='margin:2px 0'>{html.escape(repr(self.value))}</pre>"
            f"<details><summary>{len(self.attempts)} attempt(s)</summary><table><thead><tr><th>provider</th>"
            f"<th>took</th><th>result</th></tr></thead><tbody>{rows}</tbody></table></details></div>"
        )


@dataclass(frozen=True)
class Event:
    """Something that happened to a service on this node (the lab's narrative)."""

    at: float  # wall clock
    node: str
    kind: (
        str  # published, readvertise_scheduled, readvertised, unadvertised, discovered, called, failover, ...
    )
    service: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.detail.items())
        return f"[{self.node}] {self.kind} {self.service} {extra}".rstrip()


class Services:
    """The service layer of one node: its :class:`~.host.Host` and a :class:`~.interfaces.Directory` (the DHT)."""

    def __init__(
        self,
        host: Host,
        directory: Directory,
        *,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        strategy: str | Strategy = "random",
        debug: bool = False,
        seed: int | None = None,
        readvertise_fraction: float = params.READVERTISE_FRACTION,
    ):
        self.host = host
        self.directory = directory
        self.cache = DiscoveryCache(ttl=params.check_cache_ttl(cache_ttl))
        #: republish after this fraction of the TTL (a tuning knob: earlier costs messages, later risks lapses)
        self.readvertise_fraction = params.check_readvertise_fraction(readvertise_fraction)
        self._strategies: dict[str, Strategy] = {}
        self.strategy = self._strategy(strategy)
        self.stats = ProviderStats()
        self.debug = debug
        self.rng = random.Random(seed) if seed is not None else entropy.new_rng()
        self.ads: dict[str, Advertisement] = {}
        self.events: deque[Event] = deque(maxlen=1000)
        self.samples: dict[str, deque[tuple[float, float]]] = {
            "dht_query": deque(maxlen=2000),  # (wall time, seconds) of discovery lookups
            "rpc_rtt": deque(maxlen=2000),  # (wall time, seconds) of successful provider calls
            "readvertise_lateness": deque(maxlen=2000),
        }
        self.ok_calls = 0
        #: put every successful call in ``events`` (on when someone listens: the lab's views)
        self.trace_calls = False
        self._valid_names: set[str] = set()
        self._ctx_cache: SelectionContext | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self._seq = 0
        #: every re-advertisement task not finished yet -> its service (orphans included)
        self._timers: dict[asyncio.Task, str] = {}

    # ------------------------------------------------------------ events
    def on_event(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)
        self.trace_calls = True

    def _record_call(self, service: str, provider: ProviderEntry, took: float, attempts: int) -> None:
        """The "called" event, kept only while calls are traced (it costs ~20% of a cache-hit call)."""
        detail = {"provider": _label(provider), "ms": took * 1000, "attempts": attempts}
        self._deliver(Event(self.host.wall_time(), self.host.name, "called", service, detail))

    def _emit(self, kind: str, service: str, **detail: Any) -> None:
        event = Event(self.host.wall_time(), self.host.name, kind, service, detail)
        log.info("%s", event)
        self._deliver(event)

    def _deliver(self, event: Event) -> None:
        self.events.append(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken view must not break the node
                log.exception("event listener failed")

    # --------------------------------------------------------- advertise
    def key(self, name: str) -> bytes:
        return service_key(self.host.realm, name)

    def _next_seq(self) -> int:
        # time-based so that it keeps growing across restarts; strictly increasing here
        self._seq = max(self._seq + 1, int(self.host.wall_time() * 1_000_000))
        return self._seq

    async def advertise(
        self,
        name: str,
        handler: Callable[[Any], Any],
        *,
        ttl: float = DEFAULT_TTL,
        metadata: dict | None = None,
    ) -> Advertisement:
        """See the module docstring.  Concurrent advertise/unadvertise of one name run one at a time.

        Every argument is checked before anything changes: a refused advertise
        leaves a previous advertisement of ``name`` and its timer as they were.
        """
        params.check_service_name(name)
        ttl = params.check_ttl(ttl)
        metadata = params.check_metadata(metadata)
        if not callable(handler):
            raise TypeError("handler must be callable (args) -> result")
        async with self._lock(name):
            return await self._advertise(name, handler, ttl=ttl, metadata=metadata)

    async def _advertise(
        self,
        name: str,
        handler: Callable[[Any], Any],
        *,
        ttl: float = DEFAULT_TTL,
        metadata: dict | None = None,
    ) -> Advertisement:
        now = self._now()
        old = self.ads.get(name)
        if old is not None and old.task is not None:
            old.task.cancel()  # never two timers for one name
        timer = ReadvertiseTimer.start(name, ttl, now, self.readvertise_fraction)
        # the provider's name and the service travel with the record: views and labels read them
        meta = {"node": self.host.name, "service": name, **(metadata or {})}
        ad = Advertisement(name, handler, ttl, meta, timer, self._next_seq())
        self.ads[name] = ad
        self.host.procedure(name, as_procedure(handler))
        await self._publish(ad, kind="published")
        ad.task = self.host.spawn(self._readvertise_loop(ad), name=f"{self.host.name}:readvertise:{name}")
        if ad.task is not None:
            self._timers[ad.task] = name
            ad.task.add_done_callback(self._timer_done)
        self._emit(
            "readvertise_scheduled",
            name,
            every_s=round(timer.interval, 3),
            next_in_s=round(timer.delay(now), 3),
        )
        return ad

    async def _publish(self, ad: Advertisement, *, kind: str) -> None:
        entry = ProviderEntry(self.host.node_id, self.host.endpoint, ad.metadata, ad.ttl, ad.seq)
        result = await self.directory.store(self.key(ad.name), entry)
        ad.replicas = result.count
        if result.count == 0:
            ad.failures += 1
        self._emit(kind, ad.name, replicas=result.count, ttl_s=ad.ttl)
        done = getattr(result, "done", None)
        if done is not None and not done.is_set():  # the other replicas are still answering
            self.host.spawn(self._count_replicas(ad, ad.seq, result), name=f"{self.host.name}:replicas:{ad.name}")

    async def _count_replicas(self, ad: Advertisement, seq: int, result: Any) -> None:
        """Once every STORE of a publication ended, show how many replicas took it (snapshot, views)."""
        await result.done.wait()
        if ad.seq == seq:  # (not a later publication's count)
            ad.replicas = result.count

    async def _readvertise_loop(self, ad: Advertisement) -> None:
        """Republish before expiry, until unadvertise (or the node stops)."""
        while True:
            await asyncio.sleep(ad.timer.delay(self._now()))
            lateness = ad.timer.fired(self._now())
            self.samples["readvertise_lateness"].append((self.host.wall_time(), lateness))
            ad.seq = self._next_seq()
            try:
                await self._publish(ad, kind="readvertised")
            except Exception as exc:  # whatever failed, keep the schedule: the next fire may succeed
                ad.failures += 1
                log.warning(
                    "%s: re-advertising %s failed: %s: %s", self.host.name, ad.name, type(exc).__name__, exc
                )

    def _timer_done(self, task: asyncio.Task) -> None:
        self._timers.pop(task, None)

    def live_timers(self) -> list[str]:
        """Services with a re-advertisement task still running (an unadvertised one is an orphan)."""
        return sorted(name for task, name in self._timers.items() if not task.done())

    def stop_readvertising(self, name: str) -> bool:
        """Fault injection: kill ``name``'s re-advertisement timer but keep serving and listing it.

        What a crashed timer would do: the DHT records lapse after one TTL.  Procedures
        use it to show that the checklist catches a provider that never re-advertises.
        Returns False if ``name`` is not advertised here (or its timer is already gone).
        """
        ad = self.ads.get(name)
        if ad is None or ad.task is None or ad.task.done() or ad.task.cancelling():
            return False
        ad.task.cancel()
        return True

    def delay_readvertising(self, name: str, seconds: float) -> bool:
        """Fault injection: the next re-advertisement of ``name`` fires ``seconds`` late.

        What a stalled loop or a suspended host does to the timer; procedures use it to
        show that lateness (and a record lapsing before it is republished) fails the
        checklist.  Returns False if ``name`` is not advertised here with a live timer.
        """
        ad = self.ads.get(name)
        if ad is None or ad.task is None or ad.task.done() or ad.task.cancelling():
            return False
        ad.task.cancel()

        async def late() -> None:
            await asyncio.sleep(ad.timer.delay(self._now()) + seconds)
            await self._readvertise_loop(ad)  # overdue: fires at once, ``seconds`` late

        ad.task = self.host.spawn(late(), name=f"{self.host.name}:readvertise:{name}")
        if ad.task is not None:
            self._timers[ad.task] = name
            ad.task.add_done_callback(self._timer_done)
        return True

    async def unadvertise(self, name: str) -> int:
        """Stop serving ``name`` and remove this provider from the DHT; returns replicas that removed it."""
        async with self._lock(name):
            return await self._unadvertise(name)

    async def _unadvertise(self, name: str) -> int:
        ad = self.ads.pop(name, None)
        if ad is None:
            return 0
        if ad.task is not None:
            ad.task.cancel()
            await asyncio.gather(ad.task, return_exceptions=True)
        self.host.remove_procedure(name)
        self.cache.invalidate(name)
        removed = await self.directory.remove(self.key(name), self.host.node_id)
        self._emit("unadvertised", name, removed_from=removed)
        return removed

    # ----------------------------------------------------------- discover
    async def discover(self, name: str, *, refresh: bool = False) -> list[ProviderEntry]:
        """Live providers of ``name``: from the cache, else from the DHT."""
        params.check_service_name(name)
        if not refresh:
            cached = self.cache.get(name, self._now())
            if cached is not None:
                return cached
        return await self._lookup(name)

    async def _lookup(self, name: str, *, exhaustive: bool = False) -> list[ProviderEntry]:
        """Ask the DHT (the cache missed, or the caller wants fresh providers)."""
        t0 = self._now()
        entries, lookup = await self.directory.find(self.key(name), exhaustive=exhaustive)
        took = self._now() - t0
        self.samples["dht_query"].append((self.host.wall_time(), took))
        entries.sort(key=lambda e: e.node_id)
        # an empty answer drops the cached entry (and is not cached: a new provider is found at once)
        self.cache.put(name, entries, self._now())
        self._emit("discovered", name, providers=len(entries), hops=lookup.hops, ms=round(took * 1000, 2))
        return entries

    # --------------------------------------------------------------- call
    async def call(
        self,
        name: str,
        args: Any = None,
        *,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        strategy: str | Strategy | None = None,
        max_attempts: int | None = None,
        deadline: float | None = None,
        details: bool = False,
    ) -> Any:
        """Call ``name`` on one provider, failing over; see the module docstring.

        ``timeout`` bounds each attempt (connecting included); ``deadline``
        (seconds, default ``timeout`` x attempts + 1 s for discovery) bounds the
        whole call.  Returns the result, or a :class:`CallResult` with ``details``.
        """
        if name not in self._valid_names:
            params.check_service_name(name)
            if len(self._valid_names) < 10_000:
                self._valid_names.add(name)
        if timeout != DEFAULT_CALL_TIMEOUT:
            timeout = params.check_timeout(timeout)
        if max_attempts is not None:
            params.check_attempts(max_attempts)
        if deadline is not None:
            params.check_timeout(deadline, "deadline")
        chooser = self.strategy if strategy is None else self._strategy(strategy)
        loop = asyncio.get_running_loop()
        start = loop.time()
        providers = self.cache.get(name, start)  # the fast path: a cache hit, no lookup
        hit = providers is not None
        if not hit:
            providers = await self._lookup(name)
        if not providers:
            raise ServiceNotFound(f"no provider of {name!r} in realm {self.host.realm}")
        allowed = max_attempts if max_attempts is not None else min(DEFAULT_MAX_ATTEMPTS, len(providers))
        end = start + (deadline if deadline is not None else timeout * allowed + 1.0)
        attempts: list[Attempt] = []
        excluded: set[bytes] = set()
        requeried = False
        while True:
            candidates = [p for p in providers if p.node_id not in excluded] if excluded else providers
            if len(candidates) > 1 and self.stats:  # providers that failed recently wait their turn
                now = loop.time()
                trusted = [p for p in candidates if not self.stats.suspect(p.node_id, now)]
                if trusted and len(trusted) < len(candidates):
                    candidates = trusted
            if not candidates or len(attempts) >= allowed:
                # every provider we knew failed: ask the DHT once more before giving up
                if requeried:
                    break
                requeried = True
                # every replica this time, not the first to answer: one that has not yet received
                # a provider's STORE (still on its way to the farther replicas) must not end the call
                providers = await self._lookup(name, exhaustive=True)
                fresh = [p for p in providers if p.node_id not in excluded]
                if not providers:
                    tried = ", ".join(a.provider for a in attempts)
                    raise ServiceNotFound(
                        f"no provider of {name!r} is left in realm {self.host.realm} (tried {tried})"
                    )
                if not fresh:
                    break
                allowed = len(attempts) + min(DEFAULT_MAX_ATTEMPTS, len(fresh))
                if deadline is None:
                    end = max(end, loop.time() + timeout * min(DEFAULT_MAX_ATTEMPTS, len(fresh)))
                continue
            remaining = end - loop.time()
            if remaining <= 0:
                raise CallTimeout(name, attempts, f"deadline of {end - start:.3g}s passed")
            choice = chooser.choose(name, candidates, self._ctx)
            stats = self.stats
            stats.begin(choice.node_id)
            t0 = loop.time()
            try:
                value = await self._invoke(choice, name, args, min(timeout, remaining))
            except RemoteError:
                stats.finished(choice.node_id, None, ok=True)  # the provider answered
                raise
            except (TransportError, PeerError, RealmMismatch, ServiceUnavailable) as exc:
                took = loop.time() - t0
                stats.finished(choice.node_id, None, ok=False, now=loop.time())
                label = _label(choice)
                attempts.append(
                    Attempt(
                        label, choice.node_id.hex(), choice.endpoint, took, f"{type(exc).__name__}: {exc}"
                    )
                )
                excluded.add(choice.node_id)
                self.cache.evict_provider(name, choice.node_id)
                self._emit(
                    "failover", name, provider=label, error=type(exc).__name__, ms=round(took * 1000, 2)
                )
                continue
            except BaseException:  # cancelled, or a bug: keep the in-flight count honest
                stats.finished(choice.node_id, None, ok=False)
                raise
            now = loop.time()
            stats.finished(choice.node_id, now - t0, ok=True)
            self.samples["rpc_rtt"].append((self.host.wall_time(), now - t0))
            self.ok_calls += 1
            if self.trace_calls:
                self._record_call(name, choice, now - t0, len(attempts) + 1)
            if not details:  # the hot path builds nothing more
                return value
            label = _label(choice)
            attempts.append(Attempt(label, choice.node_id.hex(), choice.endpoint, now - t0))
            return CallResult(
                name, value, label, choice.node_id.hex(), choice.endpoint, now - start, tuple(attempts), hit
            )
        if attempts and all((a.error or "").startswith("RequestTimeout") for a in attempts):
            raise CallTimeout(name, attempts, "every attempt timed out")
        raise AllProvidersFailed(name, attempts)

    async def _invoke(self, provider: ProviderEntry, name: str, args: Any, timeout: float) -> Any:
        if provider.node_id == self.host.node_id:  # local first really short-circuits
            return await self._invoke_local(name, args, timeout)
        body = {"procedure": name, "args": args}
        host = self.host
        try:
            if host.session(provider.endpoint) is not None:  # pooled: the request's own timeout
                reply = await host.request(provider.endpoint, MessageType.CALL, body, timeout=timeout)
            else:  # the attempt's timeout must cover connecting too (a dead provider's handshake)
                async with asyncio.timeout(timeout):
                    reply = await host.request(provider.endpoint, MessageType.CALL, body, timeout=timeout)
        except TimeoutError:
            raise RequestTimeout(f"{name} on {_label(provider)}: no answer within {timeout:g}s") from None
        except PeerError as exc:
            if exc.remote_code == HandlerError.code:  # the handler ran and raised: no failover
                raise RemoteError.from_details(
                    name, _label(provider), exc.details, exc.remote_message
                ) from None
            raise  # no such procedure there, unavailable, busy...: the caller fails over
        except MaculaError:
            raise
        except Exception as exc:  # anything else reaching this provider is its failure: fail over
            raise ConnectFailed(f"{name} on {_label(provider)}: {type(exc).__name__}: {exc}") from exc
        return reply.body["result"]

    async def _invoke_local(self, name: str, args: Any, timeout: float) -> Any:
        ad = self.ads.get(name)
        if ad is None:
            raise PeerError("no_such_procedure", f"{name} is no longer advertised here")
        limit = asyncio.timeout(timeout)
        try:
            async with limit:
                result = ad.handler(args)
                if inspect.isawaitable(result):
                    result = await result
        except TimeoutError as exc:
            if limit.expired():
                raise RequestTimeout(f"local handler of {name} took longer than {timeout:g}s") from None
            raise RemoteError(
                name, self.host.name, type(exc).__name__, str(exc), _tb(exc) if self.debug else None
            ) from exc
        except ServiceUnavailable:
            raise
        except HandlerError as exc:  # a relayed handler (attached client) raised
            raise RemoteError.from_details(name, self.host.name, exc.details, str(exc)) from exc
        except Exception as exc:
            raise RemoteError(
                name, self.host.name, type(exc).__name__, str(exc), _tb(exc) if self.debug else None
            ) from exc
        return result

    # ------------------------------------------------------------ helpers
    @property
    def _ctx(self) -> SelectionContext:
        ctx = self._ctx_cache
        if ctx is None or ctx.local_endpoint != self.host.endpoint:
            ctx = self._ctx_cache = SelectionContext(
                self.host.node_id, self.host.endpoint, self.stats, self.rng
            )
        return ctx

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def _strategy(self, strategy: str | Strategy) -> Strategy:
        """One instance per strategy name, so that stateful ones (round_robin) keep their state."""
        if not isinstance(strategy, str):
            return strategy
        if strategy not in self._strategies:
            self._strategies[strategy] = make_strategy(strategy)
        return self._strategies[strategy]

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def snapshot(self) -> dict[str, Any]:
        now = self._now()
        return {
            "node": self.host.name,
            "advertisements": [
                {
                    **ad.timer.snapshot(now),
                    "replicas": ad.replicas,
                    "failures": ad.failures,
                    "metadata": ad.metadata,
                }
                for ad in self.ads.values()
            ],
            "cache": self.cache.stats(),
            "cached": self.cache.snapshot(now),
            "providers": self.stats.snapshot(),
        }

    def stats_dict(self) -> dict[str, Any]:
        return {"advertised": len(self.ads), **{f"cache_{k}": v for k, v in self.cache.stats().items()}}


def _label(p: ProviderEntry) -> str:
    return str(p.metadata.get("node") or p.node_id.hex()[:12])


def _tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
