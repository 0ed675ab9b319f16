"""The lab: a mesh in the kernel, or attached to nodes elsewhere, that a person watches and drives.

In a notebook cell (the kernel's loop is running)::

    lab = await Lab.start(n=3, realm="com.test.lab")      # node-1..node-3, one mesh, QUIC on loopback
    await lab.node("node-1").advertise("test.calculator", "calculator", ttl=60)
    res = await lab.node("node-2").call("test.calculator", {"a": 10, "b": 5})
    res.value, res.provider                                 # ({'result': 15, 'node': 'node-1'}, 'node-1')
    lab.metrics()                                           # tidy table: time, node, metric, value, label
    lab.dashboard()                                         # the widgets
    await lab.stop()

or, for nodes in containers, pods or on hosts (see ``macula-lab node``)::

    lab = await Lab.attach(["quic://172.20.0.11:9443", ...], realm=..., ca="certs/ca.pem", token=...)

In a plain script, the sync twins (``Lab.start_sync``, ``lab.stop_sync()``,
``lab.call_sync(...)``) run the lab on a background loop (see :mod:`._sync`).

``transport="memory"`` runs the nodes on the simulated network, where
:meth:`Lab.partition`, :meth:`Lab.heal` and :meth:`Lab.set_latency` apply.
The lab samples every node's inspection snapshot every ``sample_interval``
seconds: ``lab.snapshots`` (latest state per node, what the views draw),
``lab.events`` (the service narrative) and ``lab.metrics()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import random
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from ..core import params
from ..errors import MaculaError
from ..runtime.inspection import SECTIONS
from ..transport.base import wall_time
from ..transport.certs import issue_client_cert
from . import sync as _sync
from .logs import RowLog
from .metrics import MetricsRecorder
from .nodes import AttachedNode, LabNode, LocalNode
from .views import open_view

log = logging.getLogger(__name__)

DEFAULT_LAB_REALM = params.DEFAULT_REALM
INSPECT_TIMEOUT = 5.0
#: nodes joining at once while a lab starts: a few at a time keeps the nodes already in the
#: mesh answering (a QUIC + TLS handshake costs ~10 ms of CPU; 59 at once starved node-1
#: and joins timed out), while overlapping the round trips of several joins
JOIN_CONCURRENCY = {"quic": 4, "memory": 16}
#: how long Lab.start waits for a node that could not join at first (it retries in the background)
JOIN_TIMEOUT = 30.0


class LabError(MaculaError):
    code = "lab_error"


class NoSuchNode(LabError, KeyError):
    code = "no_such_node"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class NeedsMemoryNetwork(LabError):
    """Partitions and latency are simulated: they need ``Lab.start(transport="memory")``."""

    code = "needs_memory_network"


class Lab(_sync.AsyncFirst):
    """A set of nodes (local or attached) with sampling, metrics and views.  Build with :meth:`start` or :meth:`attach`.

    Every async method has a sync twin for scripts (``lab.sample_sync()``, ``lab.add_node_sync()``).
    """

    def __init__(
        self,
        *,
        realm: str,
        mode: str,
        token: str | None,
        transport: str = "quic",
        network: Any = None,
        certs_dir: str | None = None,
        owns_certs: bool = False,
        host: str = "127.0.0.1",
        node_options: dict[str, Any] | None = None,
        sample_interval: float | None = 1.0,
    ):
        self.realm = realm
        self.mode = mode  # "local" or "attached"
        self.token = token
        self.transport = transport
        self.network = network
        self.certs_dir = certs_dir
        self._owns_certs = owns_certs
        self._host = host
        self._node_options = dict(node_options or {})
        self._nodes: dict[str, LabNode] = {}
        #: attached clients of this lab's own nodes (attach_client), by name
        self.clients: dict[str, AttachedNode] = {}
        self._counter = 0
        self.sample_interval = sample_interval
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.events = RowLog(maxlen=5000, columns=("at", "node", "kind", "service", "detail"), title="events")
        self.recorder = MetricsRecorder()
        #: failures of background work (sampling, view updates, lab tasks): surfaced, never lost;
        #: a failed call or advertise the user asked for stays with it (its widget, its exception)
        self.errors = RowLog(maxlen=1000, columns=("at", "where", "error"), title="background errors")
        self._listeners: list[Callable[[Lab], None]] = []
        self._event_since: dict[str, float] = {}
        self._sampler: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._dashboard: Any = None
        self._rng = random.Random()
        #: local nodes that had joined when added: the bootstrap peers of the next ones
        self._joined: list[LocalNode] = []
        self.started_at = wall_time()

    # ------------------------------------------------------------ building
    @classmethod
    async def start(
        cls,
        n: int = 3,
        *,
        realm: str = DEFAULT_LAB_REALM,
        transport: str = "quic",
        certs: str | None = None,
        host: str = "127.0.0.1",
        token: str | None = None,
        latency: float = 0.0,
        jitter: float = 0.0,
        loss: float = 0.0,
        seed: int | None = 0,
        sample_interval: float | None = 1.0,
        network: Any = None,
        **node_options: Any,
    ) -> Lab:
        """Start ``n`` nodes in this loop, named node-1..node-n, joined into one mesh.

        ``transport``: ``"quic"`` (real QUIC + TLS on ``host``, certificates from a
        lab CA in ``certs``, a temporary directory by default) or ``"memory"``
        (the simulated network, with ``latency``/``jitter``/``loss``; or ``network``,
        a :class:`~macula_lab.transport.memory.MemoryNetwork` made by the caller).
        ``node_options`` go to every :class:`~macula_lab.runtime.node.Node` (k, alpha,
        cache_ttl, strategy, request_timeout, query_timeout, debug, ...).
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        if transport not in ("quic", "memory"):
            raise ValueError(f"transport must be 'quic' or 'memory', got {transport!r}")
        owns = False
        if network is not None and transport != "memory":
            raise ValueError("network= is a simulated network: it needs transport='memory'")
        if transport == "memory" and network is None:
            from ..transport.memory import MemoryNetwork

            network = MemoryNetwork(seed=seed, default_latency=latency, jitter=jitter, default_loss=loss)
        elif certs is None:
            certs, owns = tempfile.mkdtemp(prefix="macula-lab-certs-"), True
        lab = cls(
            realm=realm,
            mode="local",
            token=token or secrets.token_urlsafe(16),
            transport=transport,
            network=network,
            certs_dir=certs,
            owns_certs=owns,
            host=host,
            node_options=node_options,
            sample_interval=sample_interval,
        )
        lab._loop = asyncio.get_running_loop()
        lab._rng = random.Random(seed)
        try:
            if n:
                await lab.add_node()  # the first node is the bootstrap of the next ones
                gate = asyncio.Semaphore(JOIN_CONCURRENCY[transport])

                async def join() -> None:
                    async with gate:
                        await lab.add_node()

                await asyncio.gather(*(join() for _ in range(n - 1)))
                await lab.wait_joined()
        except BaseException:
            await lab.stop()
            raise
        lab._start_sampler()
        return lab

    async def wait_joined(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Wait until every running local node has joined the mesh; else LabError naming each and why.

        Ready means ready: a lab whose nodes answer "not found" because one of
        them never joined is worse than an error at start.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            waiting = [h for h in self._nodes.values() if isinstance(h, LocalNode) and h.running and not h.node.ready]
            if not waiting:
                return
            if loop.time() >= end:
                why = "; ".join(f"{h.name}: {h.node.dht.last_join_error or 'no contact yet'}" for h in waiting)
                raise LabError(f"{len(waiting)} node(s) could not join the mesh within {timeout:g}s: {why}")
            await asyncio.sleep(0.05)

    @classmethod
    async def attach(
        cls,
        urls: str | Iterable[str],
        *,
        realm: str,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        certs: str | None = None,
        token: str | None = None,
        insecure: bool = False,
        timeout: float = 5.0,
        sample_interval: float | None = 1.0,
        client_name: str = "lab",
    ) -> Lab:
        """Attach to running nodes (``quic://host:port``, a list or a comma-separated string).

        The lab is an attached client of each node: it needs a client certificate
        of the nodes' lab CA (``cert``/``key``, and ``ca`` to verify them; or
        ``certs=DIR`` holding ``ca.pem``, ``lab.pem`` and ``lab.key``; see
        ``macula-lab certs issue-client``).  ``token`` is the nodes' admin token
        (``MACULA_ADMIN_TOKEN``): without it the lab can advertise and call, but
        inspection (TTL watch, metrics, topology) is refused with
        :class:`~macula_lab.runtime.inspection.Unauthorized`.
        """
        from .client import connect

        if isinstance(urls, str):
            urls = [u for u in urls.replace(",", " ").split() if u]
        urls = list(urls)
        if not urls:
            raise ValueError("attach needs at least one node endpoint")
        lab = cls(realm=realm, mode="attached", token=token, sample_interval=sample_interval)
        lab._loop = asyncio.get_running_loop()

        async def one(i: int, url: str) -> AttachedNode:
            client = await connect(
                url,
                realm=realm,
                ca=ca,
                cert=cert,
                key=key,
                certs=certs,
                insecure=insecure,
                timeout=timeout,
                name=f"{client_name}-{i}",
            )
            handle = AttachedNode(client.peer.name or url, url, client, token)
            handle._loop = lab._loop
            return handle

        results = await asyncio.gather(*(one(i, u) for i, u in enumerate(urls, 1)), return_exceptions=True)
        failed = [(u, r) for u, r in zip(urls, results, strict=True) if isinstance(r, BaseException)]
        for r in results:
            if isinstance(r, AttachedNode):
                lab._nodes[r.name] = r
        if failed:
            await lab.stop()
            url, exc = failed[0]
            if not isinstance(exc, Exception):
                raise exc
            raise LabError(f"could not attach to {url}: {exc}") from exc
        lab._start_sampler()
        return lab

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the lab's nodes and tasks run on (None before it started)."""
        return self._loop

    # ---------------------------------------------------------------- nodes
    @property
    def nodes(self) -> list[LabNode]:
        return list(self._nodes.values())

    @property
    def names(self) -> list[str]:
        return list(self._nodes)

    def node(self, name: str) -> LabNode:
        try:
            return self._nodes[name]
        except KeyError:
            raise NoSuchNode(f"no node {name!r} in this lab; nodes: {self.names}") from None

    __getitem__ = node

    def running_nodes(self) -> list[LabNode]:
        return [n for n in self._nodes.values() if n.running]

    async def add_node(self, name: str | None = None, **options: Any) -> LabNode:
        """Start one more local node and join it to the mesh through the running ones."""
        self._check_local("add_node")
        self._check_loop()
        if name is None:
            self._counter += 1
            name = f"node-{self._counter}"
            while name in self._nodes:
                self._counter += 1
                name = f"node-{self._counter}"
        elif name in self._nodes:
            raise LabError(f"a node named {name!r} is already in this lab")
        from ..runtime.node import Node

        bootstrap = self._bootstrap_peers()
        kw = {**self._node_options, **options}
        if self.network is not None:
            node = Node(
                name=name,
                realm=self.realm,
                network=self.network,
                bootstrap=bootstrap,
                admin_token=self.token,
                **kw,
            )
        else:
            node = Node(
                name=name,
                realm=self.realm,
                listen=f"quic://{self._host}:0",
                certs=self.certs_dir,
                bootstrap=bootstrap,
                admin_token=self.token,
                **kw,
            )
        handle = LocalNode(node)
        handle._loop = self._loop
        self._nodes[name] = handle
        try:
            await node.start()
        except BaseException:
            del self._nodes[name]
            await node.stop()
            raise
        node.services.trace_calls = True  # the views show each call as an event
        if node.ready:
            self._joined.append(handle)
        return handle

    def _bootstrap_peers(self, want: int = 3) -> list[str]:
        """Up to ``want`` nodes that joined, at random: joins spread over the mesh, not all on node-1.

        Drawn from the list of joined nodes kept as they join (scanning every
        node's readiness per join made starting n nodes cost O(n^2)); a drawn
        node that stopped since is dropped from the list then.
        """
        while True:
            picked = self._rng.sample(self._joined, min(want, len(self._joined)))
            gone = [h for h in picked if not h.node.ready]
            if not gone:
                return [h.endpoint for h in picked]
            self._joined = [h for h in self._joined if h not in gone]

    async def attach_client(self, via: str, *, name: str | None = None) -> AttachedNode:
        """Connect an attached client to this lab's node ``via`` (on QUIC or the simulated network).

        The client is what ``macula_lab.connect`` gives a process outside the
        mesh: handlers it advertises run here and are published and relayed by
        ``via``; its calls run on ``via``.  It is not one of ``lab.nodes`` (it
        stores nothing and is not sampled); the lab closes it on :meth:`stop`.
        """
        from .client import connect

        self._check_local("attach_client")
        target = self.node(via)
        target.require_running()
        if name is None:
            name = f"client-{len(self.clients) + 1}"
        if name in self.clients or name in self._nodes:
            raise LabError(f"a node or client named {name!r} is already in this lab")
        if self.network is not None:
            client = await connect(target.endpoint, realm=self.realm, name=name, network=self.network)
        else:
            # a client certificate from the lab's own CA: what a process outside the mesh holds
            creds = issue_client_cert(self.certs_dir, name)
            client = await connect(
                target.endpoint, realm=self.realm, name=name, ca=str(creds.ca), cert=str(creds.cert), key=str(creds.key)
            )
        handle = AttachedNode(name, target.endpoint, client, self.token)
        handle._loop = self._loop
        self.clients[name] = handle
        return handle

    async def stop_node(self, name: str) -> None:
        """Stop a local node gracefully (it withdraws nothing from the DHT: records expire by TTL)."""
        node = self._local(name, "stop_node")
        await node.node.stop()

    async def kill_node(self, name: str) -> None:
        """Stop a local node abruptly: no goodbye, peers find out by timing out (a crashed host)."""
        node = self._local(name, "kill_node")
        await node.node.kill()
        if self.network is not None:
            self.network.kill(node.name)

    def _local(self, name: str, action: str) -> LocalNode:
        self._check_local(action)
        handle = self.node(name)
        assert isinstance(handle, LocalNode)
        return handle

    def _check_local(self, action: str) -> None:
        if self.mode != "local":
            raise LabError(
                f"{action} needs a lab started in this process; the nodes of an attached lab are "
                f"managed by their orchestrator (docker compose, kubectl, systemd)"
            )

    def _check_loop(self) -> None:
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            raise _sync.WrongLoop("this lab runs on another event loop: use the *_sync methods")

    # -------------------------------------------------- simulated network
    def _net(self, action: str):
        if self.network is None:
            raise NeedsMemoryNetwork(
                f"{action} needs Lab.start(transport='memory'): QUIC on loopback cannot be partitioned"
            )
        return self.network

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the mesh: nodes in different groups cannot reach each other (unlisted nodes form one more group)."""
        net = self._net("partition")
        for group in groups:
            for name in group:
                self.node(name)
        net.partition(*[list(g) for g in groups])

    def heal(self) -> None:
        self._net("heal").heal()

    def set_latency(self, seconds: float, a: str | None = None, b: str | None = None) -> None:
        """One-way latency of the link a<->b, or of every link between lab nodes."""
        net = self._net("set_latency")
        pairs = [(a, b)] if a and b else [(x, y) for x in self.names for y in self.names if x < y]
        for x, y in pairs:
            net.set_latency(x, y, seconds)

    # --------------------------------------------------------- sampling
    def _start_sampler(self) -> None:
        if self.sample_interval and self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_loop(), name="lab:sampler")

    async def _sample_loop(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.sample_interval)

    async def sample(self, sections: Iterable[str] = SECTIONS) -> dict[str, dict[str, Any]]:
        """Take one inspection snapshot of every running node now; updates views and metrics."""
        nodes = self.running_nodes()
        results = await asyncio.gather(
            *(self._inspect(n, list(sections)) for n in nodes), return_exceptions=True
        )
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                self.report_error(f"sampling {node.name}", result)
                continue
            self.snapshots[node.name] = result
            self.recorder.ingest(node.name, result)
            seen = self._event_since.get(node.name, 0.0)
            for event in result.get("events", []):
                if event["at"] > seen:  # the poll may overlap the previous one
                    self.events.append(event)
                    self._event_since[node.name] = max(self._event_since.get(node.name, 0.0), event["at"])
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception as exc:  # a broken view must not stop the sampling
                self.report_error("view update", exc)
        return self.snapshots

    async def _inspect(self, node: LabNode, sections: list[str]) -> dict[str, Any]:
        since = min(self.recorder.since.get(node.name, 0.0), self._event_since.get(node.name, 0.0))
        return await asyncio.wait_for(node.inspect(sections, since), INSPECT_TIMEOUT)

    def on_sample(self, listener: Callable[[Lab], None]) -> None:
        """Call ``listener(lab)`` after every sampling pass (the widgets refresh this way)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Lab], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def report_error(self, where: str, exc: BaseException) -> None:
        self.errors.append({"at": wall_time(), "where": where, "error": f"{type(exc).__name__}: {exc}"})
        log.warning("lab: %s failed: %s", where, exc)

    def metrics(self, metric: str | None = None, node: str | None = None) -> Any:
        """The tidy table of sampled metrics (a pandas DataFrame when pandas is installed)."""
        return self.recorder.table(metric, node)

    def metrics_summary(self) -> dict[str, dict[str, float]]:
        return self.recorder.summary()

    def spawn(self, coro, *, name: str | None = None) -> asyncio.Task:
        """Run ``coro`` as a task the lab owns (widget actions): failures land in ``lab.errors``."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.report_error(name or "task", t.exception())

        task.add_done_callback(done)
        return task

    # ------------------------------------------------------------- stop
    async def stop(self) -> None:
        """Stop sampling and every local node, detach from attached ones.  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        tasks = [t for t in (self._sampler, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sampler = None
        closers = [client.detach() for client in self.clients.values()]
        for handle in self._nodes.values():
            if isinstance(handle, LocalNode):
                closers.append(handle.node.stop())
            elif isinstance(handle, AttachedNode):
                closers.append(handle.detach())
        results = await asyncio.gather(*closers, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                self.report_error("stop", result)
        if self._owns_certs and self.certs_dir:
            shutil.rmtree(self.certs_dir, ignore_errors=True)

    @property
    def stopped(self) -> bool:
        return self._stopped

    async def __aenter__(self) -> Lab:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------- sync twins
    @classmethod
    def start_sync(cls, n: int = 3, **kw: Any) -> Lab:
        """:meth:`start` for plain scripts: the lab lives on a background loop."""
        loop = _sync.background_loop()
        return _sync.run(cls.start(n, **kw), loop, _sync.DEFAULT_TIMEOUT)

    @classmethod
    def attach_sync(cls, urls: str | Iterable[str], **kw: Any) -> Lab:
        loop = _sync.background_loop()
        return _sync.run(cls.attach(urls, **kw), loop, _sync.DEFAULT_TIMEOUT)

    def _sync_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    # stop_sync, add_node_sync, sample_sync, ...: made from the async methods (AsyncFirst);
    # the ones below predate the node twins and take the node's name first
    def advertise_sync(self, node: str, service: str, handler: Any, **kw: Any) -> int:
        return self.node(node).advertise_sync(service, handler, **kw)

    def unadvertise_sync(self, node: str, service: str) -> int:
        return self.node(node).unadvertise_sync(service)

    def discover_sync(self, node: str, service: str, **kw: Any):
        return self.node(node).discover_sync(service, **kw)

    def call_sync(self, node: str, service: str, args: Any = None, **kw: Any):
        return self.node(node).call_sync(service, args, **kw)

    def inspect_sync(self, node: str, sections: Any = None) -> dict[str, Any]:
        return self.node(node).inspect_sync(sections)

    # ------------------------------------------------------------ views
    def dashboard(self, **kw: Any):
        """All the widgets, composed (needs the ``notebook`` extra)."""
        # re-running the cell replaces the dashboard: the old one stops refreshing
        if self._dashboard is not None:
            self._dashboard.close()
        self._dashboard = open_view("dashboard", self, **kw)
        return self._dashboard

    def watch_panel(self, service: str, *, node: str | None = None, **kw: Any):
        """A live table of ``service``'s provider changes, watched from ``node`` (the first by default)."""
        return open_view("watch", self, service=service, node=node, **kw)

    def _rows(self) -> list[dict[str, Any]]:
        rows = []
        for handle in self._nodes.values():
            snap = self.snapshots.get(handle.name, {})
            metrics = (snap.get("metrics") or {}).get("gauges", {})
            rows.append(
                {
                    "node": handle.name,
                    "kind": handle.kind,
                    "state": "running" if handle.running else "stopped",
                    "endpoint": handle.endpoint,
                    "services": len(snap.get("advertisements") or []),
                    "contacts": metrics.get("routing_table_size", ""),
                    "records": metrics.get("stored_records", ""),
                }
            )
        return rows

    def __repr__(self) -> str:
        running = len(self.running_nodes())
        head = (
            f"<Lab {self.mode} realm={self.realm} transport={self.transport} "
            f"nodes={len(self._nodes)} running={running}{' stopped' if self._stopped else ''}>"
        )
        lines = [head]
        for r in self._rows():
            lines.append(
                f"  {r['node']:<12} {r['state']:<8} {r['endpoint']:<28} services={r['services']} "
                f"contacts={r['contacts']} records={r['records']}"
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = self._rows()
        head = "".join(f"<th>{html.escape(k)}</th>" for k in (rows[0] if rows else {"node": ""}))
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows
        )
        state = "stopped" if self._stopped else f"{len(self.running_nodes())}/{len(rows)} running"
        errors = (
            f"<p style='color:#b00'>{len(self.errors)} background error(s); last: "
            f"{html.escape(self.errors[-1]['where'])}: {html.escape(self.errors[-1]['error'])}</p>"
            if self.errors
            else ""
        )
        return (
            f"<div class='macula-lab'><strong>Lab</strong> ({html.escape(self.mode)}, realm "
            f"<code>{html.escape(self.realm)}</code>, {html.escape(self.transport)}, {state})"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{errors}</div>"
        )
