"""A simulation: a memory lab on a virtual clock, in its own thread, driven from a notebook.

::

    sim = await Simulation.start(n=1000, seed=1, latency=0.02, loss=0.01)
    await sim.node("node-7").advertise("test.calc", "calculator", ttl=300)
    await sim.run_for(3600)                       # an hour of simulated time
    await sim.node("node-9").discover("test.calc")
    sim.operations()                              # time, node, op, service, latency, hops, messages, outcome
    sim.trace_hash()                              # equal for equal seeds, parameters and commands
    again = await Simulation.replay(sim.seed, sim.params())

The nodes are the same :class:`~macula_lab.runtime.node.Node` code a QUIC lab
runs, on the simulated network (:mod:`macula_lab.transport.memory`), started
by :meth:`Lab.start <macula_lab.lab.lab.Lab.start>`.  Their loop is a
:class:`~.clock.VirtualTimeLoop` in a worker thread: the kernel's loop stays
free (progress bars update, other cells run), and simulated time passes only
while a command runs.  Commands are awaited from the kernel; each runs whole
on the simulation's loop.

Determinism: the node ids, request ids, refresh targets, selection, latency
jitter, loss and churn picks all draw from generators seeded by ``seed``
(:mod:`macula_lab.core.entropy` is seeded for the worker thread), events and
sequence numbers are stamped with virtual time, and every delivered frame and
clock jump goes into the trace hash.  Each command is recorded (:attr:`script`)
so :meth:`replay` can run the same simulation again from its seed and
parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from ..core import entropy
from ..core.params import DEFAULT_CALL_TIMEOUT
from ..lab.lab import Lab, LabError
from ..lab.nodes import LocalNode
from ..transport.memory import MemoryNetwork
from .clock import VirtualTimeLoop

__all__ = ["SimNode", "Simulation"]

#: columns of :meth:`Simulation.operations`
OP_COLUMNS = (
    "time",
    "node",
    "op",
    "service",
    "latency",
    "hops",
    "messages",
    "outcome",
    "providers",
    "dead_providers",
)
#: lookups (by kind) that belong to each operation, for its hop count
_LOOKUP_KINDS = {"discover": ("find_value",), "call": ("find_value",), "advertise": ("store",)}


class Simulation:
    """A memory lab of ``n`` nodes on virtual time.  Build with :meth:`start`."""

    def __init__(self, seed: int, n: int, latency: float, jitter: float, loss: float, node_options: dict[str, Any]):
        self.seed = seed
        self._params = {"n": n, "latency": latency, "jitter": jitter, "loss": loss, **node_options}
        self.node_options = node_options
        #: every command so far, as (method, args): what :meth:`replay` runs again
        self.script: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.network = MemoryNetwork(seed=seed, default_latency=latency, jitter=jitter, default_loss=loss)
        self.lab: Lab | None = None
        self.loop: VirtualTimeLoop | None = None
        self._thread: threading.Thread | None = None
        # two generators: random_nodes() is not replayed (its picks are), churn is
        self._rng = random.Random(f"{seed}:picks")
        self._churn_rng = random.Random(f"{seed}:churn")
        self._ops: list[tuple[Any, ...]] = []
        self.wall_seconds = 0.0  # wall time spent in commands
        self._progress = True
        self._lock: asyncio.Lock | None = None

    # ------------------------------------------------------------ building
    @classmethod
    async def start(
        cls,
        n: int = 100,
        *,
        seed: int = 1,
        latency: float = 0.02,
        jitter: float = 0.0,
        loss: float = 0.0,
        progress: bool = True,
        **node_options: Any,
    ) -> Simulation:
        """Start ``n`` nodes (node-1..node-n) joined into one mesh, on a virtual clock at 0.

        ``latency`` is the one-way delay of every link (plus a uniform ``[0,
        jitter)``), ``loss`` the probability a frame is lost; ``node_options`` go
        to every node (k, alpha, request_timeout, query_timeout, ...).
        """
        if not isinstance(seed, int):
            raise ValueError("a simulation needs an integer seed (it is what makes it reproducible)")
        sim = cls(seed, n, latency, jitter, loss, dict(node_options))
        sim._progress = progress
        sim._spawn_thread()
        try:
            await sim._drive(sim._start_lab(n), "join", total=n, count=lambda: len(sim.network))
        except BaseException:
            await sim.stop()
            raise
        return sim

    @classmethod
    async def replay(cls, seed: int, params: dict[str, Any], *, progress: bool = True) -> Simulation:
        """Run a simulation again: the same seed, parameters and commands (``params`` from :meth:`params`)."""
        params = dict(params)
        script = params.pop("script", [])
        n = params.pop("n")
        sim = await cls.start(n, seed=seed, progress=progress, **params)
        for method, args, kwargs in script:
            result = getattr(sim, method)(*args, **kwargs)
            if asyncio.iscoroutine(result):
                await result
        return sim

    def params(self) -> dict[str, Any]:
        """What :meth:`replay` needs besides the seed: start parameters and the commands run since."""
        return {**self._params, "script": list(self.script)}

    def _spawn_thread(self) -> None:
        ready = threading.Event()

        def main() -> None:
            # everything the nodes draw in this thread follows from the seed
            entropy.use(random.Random(f"{self.seed}:entropy"))
            loop = VirtualTimeLoop()
            asyncio.set_event_loop(loop)
            self.loop = loop
            self.network.on_deliver = lambda src, dst, data: loop.note(src, dst, data)
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name=f"macula-sim-{self.seed}", daemon=True)
        self._thread.start()
        ready.wait()

    async def _start_lab(self, n: int) -> None:
        self.lab = await Lab.start(
            n, transport="memory", network=self.network, seed=self.seed, sample_interval=None, **self.node_options
        )

    # ----------------------------------------------------------- driving
    async def _drive(
        self,
        coro: Coroutine[Any, Any, Any],
        what: str,
        *,
        total: float | None = None,
        count: Callable[[], float] | None = None,
    ) -> Any:
        """Run ``coro`` on the simulation's loop (time moves meanwhile); a progress bar while it runs."""
        loop = self.loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            coro.close()
            raise LabError("this simulation is stopped")

        async def driven() -> Any:
            loop.driving += 1
            try:
                return await coro
            finally:
                loop.driving -= 1

        if self._lock is None:
            self._lock = asyncio.Lock()
        started = time.perf_counter()
        # one command at a time, handed over while the loop is idle: the simulation's order
        # of events then never depends on when the kernel's thread got to run
        async with self._lock:
            await loop.wait_idle()
            return await self._await(loop, driven(), what, total, count, started)

    async def _await(self, loop, coro, what, total, count, started) -> Any:
        fut = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
        bar = _bar(what, total) if self._progress and total else None
        try:
            while not fut.done():
                await asyncio.wait({fut}, timeout=0.25)
                if bar is not None:
                    bar.n = round(min(total, count() if count else loop.time()), 1)
                    bar.refresh()
            return fut.result()
        finally:
            if not fut.done():
                fut.cancel()
            if bar is not None:
                bar.close()
            self.wall_seconds += time.perf_counter() - started

    async def run(self, fn: Callable[[Simulation], Coroutine[Any, Any, Any]], what: str = "run") -> Any:
        """Run ``await fn(sim)`` on the simulation's loop (not recorded for replay: pass a named method)."""
        return await self._drive(fn(self), what)

    async def run_for(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass (timers, re-advertisements, expiry, churn in progress)."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        self.script.append(("run_for", (seconds,), {}))
        start = self.now

        async def wait() -> None:
            await asyncio.sleep(seconds)

        await self._drive(wait(), f"{seconds:g} simulated s", total=seconds, count=lambda: self.now - start)

    @property
    def now(self) -> float:
        """Simulated seconds since the start."""
        return self.loop.time() if self.loop is not None else 0.0

    def trace_hash(self) -> str:
        """The hash of every frame delivered and every clock jump so far, in order."""
        assert self.loop is not None
        return self.loop.trace_hash()

    async def stop(self) -> None:
        """Stop every node and the simulation's thread.  Idempotent."""
        loop, thread = self.loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        if self.lab is not None:
            await self._drive(self.lab.stop(), "stop")
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)

    async def __aenter__(self) -> Simulation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -------------------------------------------------------------- nodes
    @property
    def names(self) -> list[str]:
        return self.lab.names if self.lab is not None else []

    def running(self) -> list[str]:
        assert self.lab is not None
        return [h.name for h in self.lab.running_nodes()]

    def node(self, name: str) -> SimNode:
        assert self.lab is not None
        self.lab.node(name)  # NoSuchNode now, not inside the simulation
        return SimNode(self, name)

    def random_nodes(self, count: int) -> list[str]:
        """``count`` running nodes drawn with the simulation's seeded generator (with replacement)."""
        names = self.running()
        return [names[self._rng.randrange(len(names))] for _ in range(count)]

    # ------------------------------------------------------ bulk operations
    async def advertise_many(
        self, pairs: Iterable[tuple[str, str]], *, handler: str = "echo", ttl: int = 300, concurrency: int = 256
    ) -> None:
        """Advertise each ``(node, service)``, ``concurrency`` at a time; results in :meth:`operations`."""
        pairs = [tuple(p) for p in pairs]
        self.script.append(("advertise_many", (pairs,), {"handler": handler, "ttl": ttl, "concurrency": concurrency}))
        await self._many(pairs, concurrency, lambda node, svc: self._advertise(node, svc, handler, ttl, None))

    async def discover_many(
        self, pairs: Iterable[tuple[str, str]], *, concurrency: int = 256, refresh: bool = True
    ) -> None:
        """Discover each ``(node, service)``, ``concurrency`` at a time: bypassing the cache unless
        ``refresh=False`` (what an application sees, stale cache entries included)."""
        pairs = [tuple(p) for p in pairs]
        self.script.append(("discover_many", (pairs,), {"concurrency": concurrency, "refresh": refresh}))
        await self._many(pairs, concurrency, lambda node, svc: self._discover(node, svc, refresh))

    async def call_many(
        self,
        pairs: Iterable[tuple[str, str]],
        *,
        args: Any = None,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        max_attempts: int | None = None,
        concurrency: int = 256,
    ) -> None:
        """Call each ``(node, service)`` (cache, selection and failover as an application gets them);
        ``timeout`` bounds each attempt, ``max_attempts`` the providers tried."""
        pairs = [tuple(p) for p in pairs]
        options = {"args": args, "timeout": timeout, "max_attempts": max_attempts, "concurrency": concurrency}
        self.script.append(("call_many", (pairs,), options))

        async def call(node: str, svc: str) -> None:
            with contextlib.suppress(Exception):  # recorded in operations()
                await self._op(
                    node, "call", svc, lambda h: h.call(svc, args, timeout=timeout, max_attempts=max_attempts)
                )

        await self._many(pairs, concurrency, call)

    async def _many(self, pairs: list[tuple[str, ...]], concurrency: int, op: Callable[..., Any]) -> None:
        done = [0]

        async def all_of_them() -> None:
            gate = asyncio.Semaphore(concurrency)

            async def one(node: str, svc: str) -> None:
                async with gate:
                    await op(node, svc)
                done[0] += 1

            await asyncio.gather(*(one(node, svc) for node, svc in pairs))

        await self._drive(all_of_them(), "operations", total=len(pairs), count=lambda: done[0])

    # -------------------------------------------------------------- faults
    async def kill(self, name: str) -> None:
        """Crash a node: silent, peers find out by timing out."""
        self.script.append(("kill", (name,), {}))
        assert self.lab is not None
        await self._drive(self.lab.kill_node(name), "kill")

    async def stop_node(self, name: str) -> None:
        """Stop a node gracefully (its sessions close; its records expire by TTL)."""
        self.script.append(("stop_node", (name,), {}))
        assert self.lab is not None
        await self._drive(self.lab.stop_node(name), "stop")

    async def add(self, count: int = 1) -> list[str]:
        """Start ``count`` more nodes, joined through running ones; their names."""
        self.script.append(("add", (count,), {}))
        assert self.lab is not None
        lab = self.lab

        async def adding() -> list[str]:
            return [(await lab.add_node()).name for _ in range(count)]

        return await self._drive(adding(), "add", total=count, count=lambda: 0)

    async def churn(
        self,
        fraction: float,
        every: float,
        duration: float,
        *,
        service: str | None = None,
        ttl: int = 300,
    ) -> dict[str, list[tuple[float, str]]]:
        """Every ``every`` simulated seconds for ``duration``, crash ``fraction`` of the running nodes
        (seeded picks) and start as many new ones; with ``service`` (a template such as
        ``"svc.{node}"``) each new node advertises it with ``ttl``.  Returns who was killed
        and added, with the simulated time.
        """
        self.script.append(("churn", (fraction, every, duration), {"service": service, "ttl": ttl}))
        assert self.lab is not None
        lab = self.lab
        log: dict[str, list[tuple[float, str]]] = {"killed": [], "added": []}
        start = self.now

        async def churning() -> None:
            loop = asyncio.get_running_loop()
            end = loop.time() + duration
            while loop.time() + every <= end + 1e-9:
                await asyncio.sleep(every)
                running = [h.name for h in lab.running_nodes()]
                victims = self._churn_rng.sample(running, round(len(running) * fraction))
                for name in victims:
                    await lab.kill_node(name)
                    log["killed"].append((loop.time(), name))

                async def join() -> None:
                    handle = await lab.add_node()
                    log["added"].append((loop.time(), handle.name))
                    if service:
                        await self._advertise(handle.name, service.format(node=handle.name), "echo", ttl, None)

                await asyncio.gather(*(join() for _ in victims))
            rest = end - loop.time()
            if rest > 0:
                await asyncio.sleep(rest)

        await self._drive(churning(), "churn", total=duration, count=lambda: self.now - start)
        return log

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network into groups that cannot reach each other (unlisted nodes: one more group)."""
        groups_ = tuple(list(g) for g in groups)
        self.script.append(("partition", groups_, {}))
        self._call_soon(self.network.partition, *groups_)

    def heal(self) -> None:
        self.script.append(("heal", (), {}))
        self._call_soon(self.network.heal)

    def set_latency(self, seconds: float | None, a: str, b: str) -> None:
        """One-way latency of the link a<->b (``None``: the default again)."""
        self.script.append(("set_latency", (seconds, a, b), {}))
        self._call_soon(self.network.set_latency, a, b, seconds)

    def set_loss(self, probability: float | None, a: str, b: str) -> None:
        self.script.append(("set_loss", (probability, a, b), {}))
        self._call_soon(self.network.set_loss, a, b, probability)

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        # the network belongs to the simulation's thread; time is paused between commands,
        # so the change lands before the next command's first event whatever the thread timing
        assert self.loop is not None
        done = threading.Event()
        error: list[BaseException] = []

        def apply() -> None:
            try:
                fn(*args)
            except BaseException as exc:
                error.append(exc)
            finally:
                done.set()

        while not self.loop.idle.is_set():  # as for commands: only while nothing else is ready
            time.sleep(0.001)
        self.loop.call_soon_threadsafe(apply)
        done.wait()
        if error:
            raise error[0]

    # ---------------------------------------------------- single operations
    async def _op(self, name: str, op: str, service: str, work: Callable[[LocalNode], Coroutine]) -> Any:
        """Run one node operation on the simulation's loop and record its row."""
        assert self.lab is not None
        handle = self.lab.node(name)
        assert isinstance(handle, LocalNode)
        node = handle.node
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent0 = node.transport.stats().get("requests_sent", 0) if node.running else 0
        last = node.dht.lookups[-1] if node.dht.lookups else None
        outcome, providers, dead, result, error = "ok", None, None, None, None
        try:
            result = await work(handle)
        except Exception as exc:
            outcome, error = type(exc).__name__, exc
        latency = loop.time() - t0
        hops = 0
        kinds = _LOOKUP_KINDS.get(op, ())
        for record in reversed(node.dht.lookups):
            if record is last:
                break
            if record.kind in kinds:
                hops = max(hops, record.hops)
        if op == "discover" and error is None:
            providers = len(result)
            dead = sum(1 for e in result if not self._alive(e.endpoint))
            if not result:
                outcome = "not_found"
        sent = node.transport.stats().get("requests_sent", 0) - sent0
        self._ops.append((t0, name, op, service, latency, hops, sent, outcome, providers, dead))
        if error is not None:
            raise error
        return result

    def _alive(self, endpoint: str) -> bool:
        transport = self.network.get(endpoint)
        return transport is not None and self.network.alive(endpoint) and transport.started

    async def _advertise(self, name: str, service: str, handler: Any, ttl: int, metadata: Any) -> int | None:
        try:
            return await self._op(name, "advertise", service, lambda h: h.advertise(service, handler, ttl=ttl, metadata=metadata))
        except Exception:
            return None  # recorded in operations()

    async def _discover(self, name: str, service: str, refresh: bool) -> Any:
        try:
            return await self._op(name, "discover", service, lambda h: h.discover(service, refresh=refresh))
        except Exception:
            return None

    async def _node_op(self, name: str, op: str, service: str, *args: Any) -> Any:
        if op == "advertise":
            handler, ttl, metadata = args
            work = lambda h: h.advertise(service, handler, ttl=ttl, metadata=metadata)  # noqa: E731
        elif op == "discover":
            (refresh,) = args
            work = lambda h: h.discover(service, refresh=refresh)  # noqa: E731
        elif op == "call":
            (call_args,) = args
            work = lambda h: h.call(service, call_args)  # noqa: E731
        elif op == "unadvertise":
            work = lambda h: h.unadvertise(service)  # noqa: E731
        else:
            raise ValueError(f"unknown operation {op!r}")
        return await self._drive(self._op(name, op, service, work), op)

    # ------------------------------------------------------------- results
    def operations(self) -> Any:
        """Every node operation so far, one row each (a pandas DataFrame; the rows without pandas).

        ``time`` is simulated seconds at the start, ``latency`` simulated seconds,
        ``hops`` the longest lookup the operation ran, ``messages`` the requests the
        node sent meanwhile, ``outcome`` ``ok``, ``not_found`` or the error's name;
        for discoveries, ``providers`` found and how many of them are not running.
        """
        rows = [dict(zip(OP_COLUMNS, r, strict=True)) for r in self._ops]
        try:
            import pandas as pd
        except ImportError:
            return rows
        return pd.DataFrame(rows, columns=list(OP_COLUMNS))

    def stats(self) -> dict[str, Any]:
        """Network counters, simulated and wall seconds so far, and simulated seconds per wall second."""
        return {
            **self.network.stats(),
            "sim_seconds": self.now,
            "wall_seconds": self.wall_seconds,
            "speed": self.now / self.wall_seconds if self.wall_seconds else 0.0,
            "trace_hash": self.trace_hash() if self.loop is not None else "",
        }

    def __repr__(self) -> str:
        return (
            f"<Simulation seed={self.seed} nodes={len(self.names)} t={self.now:.1f}s "
            f"ops={len(self._ops)} trace={self.trace_hash()[:12] if self.loop else '-'}>"
        )


class SimNode:
    """One node of a simulation, driven from the kernel: the lab node API, recorded in operations()."""

    def __init__(self, sim: Simulation, name: str):
        self.sim = sim
        self.name = name

    async def advertise(self, service: str, handler: str = "echo", *, ttl: int = 300, metadata: Any = None) -> int:
        if not isinstance(handler, str):
            raise TypeError("a simulation advertises handlers by name ('echo', 'calculator'): it must replay")
        self.sim.script.append(("_node_op", (self.name, "advertise", service, handler, ttl, metadata), {}))
        return await self.sim._node_op(self.name, "advertise", service, handler, ttl, metadata)

    async def discover(self, service: str, *, refresh: bool = False) -> list[Any]:
        self.sim.script.append(("_node_op", (self.name, "discover", service, refresh), {}))
        return await self.sim._node_op(self.name, "discover", service, refresh)

    async def call(self, service: str, args: Any = None) -> Any:
        self.sim.script.append(("_node_op", (self.name, "call", service, args), {}))
        return await self.sim._node_op(self.name, "call", service, args)

    async def unadvertise(self, service: str) -> int:
        self.sim.script.append(("_node_op", (self.name, "unadvertise", service), {}))
        return await self.sim._node_op(self.name, "unadvertise", service)

    def __repr__(self) -> str:
        return f"<SimNode {self.name}>"




def _bar(what: str, total: float) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=what, leave=False)
