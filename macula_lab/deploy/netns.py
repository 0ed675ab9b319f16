"""Multi-host runs on one Linux machine: nodes in network namespaces, configured by the deployment files.

Each node runs ``macula-lab node`` in a network namespace of its own (its own
``eth0``, address, ports and ``/etc/hosts``), all joined by a bridge; the root
namespace holds the bridge's address, so a lab in this process (or a notebook
kernel) attaches to the nodes as it would to containers or hosts.  The nodes
get **exactly the environment** ``docker/compose.yaml`` or the k3s StatefulSet
gives them (read by :mod:`macula_lab.deploy.manifests`): only container paths of
mounted volumes are mapped to host directories, and host names resolve through
each namespace's hosts file as Docker's DNS or the headless service would.

    from macula_lab.deploy.netns import NetnsMesh

    async with NetnsMesh(source="compose") as mesh:      # node-1..node-3, as in the compose file
        mesh.endpoints          # ['quic://172.20.0.11:9443', ...]  dialable from here
        mesh.ca, mesh.token, mesh.realm
        lab = await Lab.attach(**mesh.attach_args())      # urls, realm, ca, token
        await mesh.kill("node-1")                         # SIGKILL the node process
        await mesh.start_node("node-1")                   # the same node again, waits until ready
        await mesh.disconnect("node-3"); await mesh.reconnect("node-3")   # cable out / in
        await mesh.kill_namespace("node-3")               # the "host" is gone: no answer at all

    NetnsMesh(source="k3s")     # macula-0..2 with the StatefulSet's env and stable DNS names
    NetnsMesh(n=5, source="k3s")  # replicas=5

Public API (all coroutines are bounded in time):

* ``NetnsMesh(n=None, *, source="compose"|"k3s", compose_file=None,
  statefulset_file=None, environ=None, overrides=None, token=None,
  workdir=None, subnet=None, ready_timeout=30.0, python=sys.executable)``;
  ``await mesh.start()`` / ``await mesh.close()`` or ``async with``.
  ``token`` is the k3s pods' admin token (their Secret; random by default; the
  compose nodes use the file's).  ``subnet`` (e.g. ``"10.99.0.0/24"``) replaces
  the automatic choice of a free ``/24`` of ``172.20.0.0/16``, for machines
  where that range is taken (a running compose network is).
  ``environ`` is the shell environment ``docker compose`` would interpolate
  (``${MACULA_REALM:-...}``); ``overrides`` replaces variables after the files
  are read, for scaling time in procedures (``{"MACULA_SERVICE_TTL": "4"}``:
  re-advertisement every 3.2 s instead of 240 s) and is empty by default.
* ``mesh.names``, ``mesh.endpoints``, ``mesh.endpoint(name)``,
  ``mesh.health_url(name, path="/health")``, ``mesh.nodes[name]``
  (:class:`MeshNode`: namespace, address, advertised endpoint, serves, process,
  ``log_text()``), ``mesh.ca``, ``mesh.token``, ``mesh.realm``, ``mesh.subnet``,
  ``mesh.attach_args()``, ``mesh.info()`` (JSON-able, for papermill parameters).
* ``await mesh.kill(name)``, ``await mesh.stop_node(name)`` (SIGTERM),
  ``await mesh.start_node(name)``, ``await mesh.disconnect(name)``,
  ``await mesh.reconnect(name)``, ``await mesh.kill_namespace(name)``.

Cleanup: ``close()`` stops the nodes and removes the namespaces, veths, bridge,
hosts files and the temporary work directory; it runs on any failure inside
``start()`` or the ``async with`` body, an ``atexit`` hook covers an interpreter
that exits without closing, and every start first removes leftovers of runs
whose process died (SIGKILL, power loss).  Names carry a random run id, each
run takes its own ``/24`` of ``172.20.0.0/16`` (the compose network; host parts
as in the compose file, ``.11``, ``.12``, ...), so runs can go in parallel.
Only addresses inside these namespaces are used; namespaces get no default
route, so nothing leaves the machine.

Requires Linux, root and iproute2; :func:`unavailable_reason` says why not
(the pytest fixture skips with it).  Command line::

    python -m macula_lab.deploy.netns up [--source compose|k3s] [-n N] [--json FILE]   # until Ctrl-C
    python -m macula_lab.deploy.netns status | down [--all] | check
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.endpoint import parse_endpoint
from ..errors import MaculaError
from ..lab.client import CLIENT_CERT_NAME
from ..transport.certs import ensure_ca, issue_client_cert, issue_node_cert
from . import netns_ip
from .config import ConfigError, config_from_env
from .manifests import NodeSpec, compose_nodes, statefulset_nodes
from .netns_ip import NetnsError, NetnsUnavailable, Network, clean_stale, unavailable_reason
from .procs import NodeProcess, NodeProcessError, wait_ready

__all__ = [
    "MeshNode",
    "NetnsError",
    "NetnsMesh",
    "NetnsUnavailable",
    "clean_stale",
    "unavailable_reason",
]

SOURCES = ("compose", "k3s")
K3S_TOKEN_SECRET = ("macula-lab", "admin-token")  # k3s/nodes/kustomization.yaml's secretGenerator
FIRST_HOST = 11  # node-1 is .11 in the compose file
STOP_TIMEOUT = 10.0
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # nodes run the same code as this process
_ENV_PASSED = ("PATH", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV", "PYTHONPATH")  # the "image" part of the env


@dataclass
class MeshNode:
    """One node of a :class:`NetnsMesh`: where it runs, and its current process."""

    name: str
    index: int
    namespace: str
    address: str
    spec: NodeSpec
    port: int = 9443
    health_port: int | None = None
    advertised: str = ""  # the endpoint it announces to peers (from its ready line)
    process: NodeProcess | None = None
    history: list[str] = field(default_factory=list)  # output of earlier processes (after restarts)

    @property
    def endpoint(self) -> str:
        """``quic://<address>:<port>``: dialable from the root namespace (the cert has the IP)."""
        return f"quic://{self.address}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.proc.returncode is None

    @property
    def serves(self) -> list[str]:
        """The built-in services it advertises (``MACULA_SERVE``)."""
        try:
            return list(config_from_env(self.spec.env).serve)
        except ConfigError:
            return []

    def health_url(self, path: str = "/health") -> str | None:
        return None if self.health_port is None else f"http://{self.address}:{self.health_port}{path}"

    def log_text(self) -> str:
        return "\n".join([*self.history, *(self.process.lines if self.process else [])])


class NetnsMesh:
    """Nodes from ``docker/compose.yaml`` or the k3s StatefulSet in network namespaces (module docstring)."""

    def __init__(
        self,
        n: int | None = None,
        *,
        source: str = "compose",
        compose_file: str | Path | None = None,
        statefulset_file: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, str] | None = None,
        token: str | None = None,
        workdir: str | Path | None = None,
        subnet: str | None = None,
        ready_timeout: float = 30.0,
        python: str = sys.executable,
    ):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if n is not None and n < 1:
            raise ValueError("n must be >= 1")
        self.n, self.source = n, source
        self.compose_file, self.statefulset_file = compose_file, statefulset_file
        self.environ = dict(environ or {})
        self.overrides = dict(overrides or {})
        self.ready_timeout = ready_timeout
        self._preferred = ipaddress.ip_network(subnet) if subnet else None
        self.python = python
        self._token = token
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else None
        self.net = Network()
        self.nodes: dict[str, MeshNode] = {}
        self.realm = ""
        self.token = ""
        self._started = False
        self._closed = False

    # ------------------------------------------------------------ facts
    @property
    def names(self) -> list[str]:
        return list(self.nodes)

    @property
    def endpoints(self) -> list[str]:
        return [node.endpoint for node in self.nodes.values()]

    @property
    def ca(self) -> str:
        return str(self._certs_dir / "ca.pem")

    @property
    def subnet(self) -> str:
        return str(self.net.subnet)

    @property
    def _certs_dir(self) -> Path:
        assert self.workdir is not None, "the mesh is not started"
        return self.workdir / "certs"

    def node(self, name: str) -> MeshNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"no node {name!r} in this mesh; nodes: {', '.join(self.nodes)}") from None

    def endpoint(self, name: str) -> str:
        return self.node(name).endpoint

    def health_url(self, name: str, path: str = "/health") -> str | None:
        return self.node(name).health_url(path)

    @property
    def certs(self) -> str:
        """The certificate directory: ``ca.pem``, the nodes' certificates and the lab's client one (``lab.pem``)."""
        return str(self._certs_dir)

    def attach_args(self) -> dict[str, Any]:
        """Keyword arguments for ``Lab.attach``: urls, realm, certs (CA and client certificate), token."""
        return {"urls": self.endpoints, "realm": self.realm, "certs": self.certs, "token": self.token}

    def info(self) -> dict[str, Any]:
        """Everything a procedure needs, JSON-able (papermill parameters, ``up --json``)."""
        return {
            "source": self.source,
            "run": self.net.run,
            "subnet": self.subnet,
            "realm": self.realm,
            "ca": self.ca,
            "certs": self.certs,
            "token": self.token,
            "endpoints": self.endpoints,
            "nodes": {
                name: {
                    "endpoint": node.endpoint,
                    "advertised": node.advertised,
                    "namespace": node.namespace,
                    "address": node.address,
                    "health": node.health_url(),
                    "serves": node.serves,
                    "pid": node.process.pid if node.running and node.process else None,
                }
                for name, node in self.nodes.items()
            },
        }

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return f"<NetnsMesh {self.source} {state} {self.names} subnet={self.net.subnet}>"

    # ------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> NetnsMesh:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> NetnsMesh:
        """Create the network, issue certificates, start every node and wait until all are ready."""
        if self._started:
            return self
        reason = await asyncio.to_thread(unavailable_reason)
        if reason:
            raise NetnsUnavailable(reason)
        self._started = True
        _live.add(self)
        try:
            await asyncio.to_thread(clean_stale)
            if self.workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix=f"macula-netns-{self.net.run}-"))
            await asyncio.to_thread(self.net.create, self._preferred)
            specs = self._specs()
            await asyncio.to_thread(self._build, specs)
            await self._start_in_order()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Stop every node, remove the namespaces, bridge and work directory.  Idempotent."""
        if self._closed or not self._started:
            return
        self._closed = True
        try:
            await asyncio.gather(*(self._stop(node) for node in self.nodes.values()), return_exceptions=True)
        finally:
            problems = await asyncio.to_thread(self._teardown_sync)
            _live.discard(self)
        if problems:
            raise NetnsError("could not remove everything: " + "; ".join(problems))

    def _teardown_sync(self) -> list[str]:
        for node in self.nodes.values():  # whatever is still running (an interrupted close, atexit)
            if node.process is not None and node.process.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.process.pid, signal.SIGKILL)
        problems = self.net.destroy() if self.net.subnet is not None else []
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return problems

    # ------------------------------------------------------------ building
    def _specs(self) -> list[NodeSpec]:
        if self.source == "compose":
            specs = compose_nodes(self.compose_file, environ=self.environ)
            if self.n is not None:
                if self.n > len(specs):
                    raise ValueError(f"the compose file has {len(specs)} nodes, asked for {self.n}")
                specs = specs[: self.n]
            return specs
        self._token = self._token or secrets.token_hex(16)
        probe = statefulset_nodes(
            self.statefulset_file, replicas=self.n, secrets={K3S_TOKEN_SECRET: self._token}
        )
        ips = {spec.name: self.net.address(FIRST_HOST + i) for i, spec in enumerate(probe)}
        return statefulset_nodes(
            self.statefulset_file, replicas=self.n, secrets={K3S_TOKEN_SECRET: self._token}, pod_ips=ips
        )

    def _host_part(self, spec: NodeSpec, index: int, taken: set[int]) -> int:
        if spec.address:  # keep the compose file's host part: 172.20.0.11 -> <subnet>.11
            host = int(ipaddress.ip_address(spec.address)) & 0xFF
            if host not in taken and 1 < host < 255:
                return host
        host = FIRST_HOST + index
        while host in taken:
            host += 1
        return host

    def _build(self, specs: list[NodeSpec]) -> None:
        """Addresses, certificates, namespaces (sync, in a worker thread)."""
        taken: set[int] = set()
        planned: list[tuple[NodeSpec, str]] = []
        for index, spec in enumerate(specs):
            host = self._host_part(spec, index, taken)
            taken.add(host)
            planned.append((spec, self.net.address(host)))
        hosts = [(address, spec.hostnames) for spec, address in planned]
        self._certs_dir.mkdir(parents=True, exist_ok=True)
        ensure_ca(self._certs_dir)
        issue_client_cert(self._certs_dir, CLIENT_CERT_NAME)  # what a lab attaching from here holds
        for index, (spec, address) in enumerate(planned):
            mapped = spec.with_mounts({volume: str(self._certs_dir) for volume in spec.mounts.values()})
            mapped = replace(mapped, env={**mapped.env, **self.overrides})
            config = config_from_env(mapped.env)  # the node parses the same; fail here with the reason
            config.validate()
            dns = [h for h in spec.hostnames if _DNS_NAME.fullmatch(h)]  # not container names like a_b
            issue_node_cert(self._certs_dir, config.name, dns=dns, ips=[address])
            namespace = self.net.add_namespace(index, address, hosts)
            node = MeshNode(
                name=spec.name,
                index=index,
                namespace=namespace,
                address=address,
                spec=mapped,
                port=parse_endpoint(config.listen).port,
            )
            self.nodes[spec.name] = node
        tokens = {n.spec.env.get("MACULA_ADMIN_TOKEN", "") for n in self.nodes.values()}
        realms = {config_from_env(n.spec.env).realm for n in self.nodes.values()}
        self.token = tokens.pop() if len(tokens) == 1 else ""
        self.realm = realms.pop() if len(realms) == 1 else ""

    # ------------------------------------------------------------ processes
    async def _start_in_order(self) -> None:
        """Start nodes in waves: a node starts once the nodes it depends on are ready."""
        ready: set[str] = set()
        pending = dict(self.nodes)
        while pending:
            wave = [
                n for n in pending.values() if all(d in ready or d not in self.nodes for d in n.spec.after)
            ]
            if not wave:
                raise NetnsError(f"dependency cycle among {sorted(pending)}")
            await asyncio.gather(*(self._launch(node) for node in wave))
            for node in wave:
                ready.add(node.name)
                del pending[node.name]

    async def _launch(self, node: MeshNode) -> None:
        base = {k: os.environ[k] for k in _ENV_PASSED if k in os.environ}
        base["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, base.get("PYTHONPATH")) if p)
        workdir = self.workdir / "nodes" / node.name  # type: ignore[operator]
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        env = {**base, "HOME": str(workdir), "HOSTNAME": node.spec.hostnames[0], **node.spec.env}
        cmd = [
            "ip",
            "netns",
            "exec",
            node.namespace,
            self.python,
            "-m",
            "macula_lab",
            "node",
            *node.spec.args,
        ]
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
        if node.process is not None:
            node.history += node.process.lines
        node.process = NodeProcess(node.name, proc)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        try:
            await wait_ready(node.process, self.ready_timeout)
        except NodeProcessError as exc:
            raise NetnsError(f"{node.name} in {node.namespace}: {exc}") from None
        node.advertised = node.process.endpoint
        node.health_port = node.process.health_port
        await self._wait_healthy(node, deadline)

    async def _wait_healthy(self, node: MeshNode, deadline: float) -> None:
        """Poll ``/ready`` from the root namespace: the node joined, and the bridge carries traffic."""
        url = node.health_url("/ready")
        if url is None:
            return
        loop = asyncio.get_running_loop()
        last = "no answer"
        while loop.time() < deadline:
            if not node.running:
                raise NetnsError(
                    f"{node.name} exited with {node.process.proc.returncode}:\n{node.log_text()}"
                )
            try:
                status = await http_status(url, timeout=min(1.0, max(0.05, deadline - loop.time())))
                if status == 200:
                    return
                last = f"HTTP {status}"
            except (OSError, TimeoutError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.1)
        log_text = node.log_text()
        hint = ""
        if "not reachable" in log_text and "cannot resolve" not in log_text:
            hint = " (peers unreachable: is bridged traffic filtered? iptables FORWARD with br_netfilter)"
        raise NetnsError(
            f"{node.name} not ready at {url} within {self.ready_timeout:g}s ({last}){hint}; its log:\n{log_text}"
        )

    async def _stop(
        self, node: MeshNode, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT
    ) -> int | None:
        if node.process is None:
            return None
        return await node.process.stop(sig, timeout)

    # ------------------------------------------------------------ faults
    async def kill(self, name: str) -> int | None:
        """SIGKILL the node's process (its namespace and address stay: the port stops answering)."""
        return await self._stop(self.node(name), signal.SIGKILL, timeout=5.0)

    async def stop_node(self, name: str, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM the node (a graceful stop, as ``docker stop`` / pod deletion); its exit code."""
        return await self._stop(self.node(name), signal.SIGTERM, timeout)

    async def start_node(self, name: str) -> MeshNode:
        """Start a stopped or killed node again with the same environment; waits until ready.

        After :meth:`kill_namespace` the namespace is made again first (same address).
        """
        node = self.node(name)
        if node.running:
            raise NetnsError(f"{name} is running (pid {node.process.pid})")  # type: ignore[union-attr]
        if node.namespace not in self.net.namespaces:
            hosts = [(n.address, n.spec.hostnames) for n in self.nodes.values()]
            await asyncio.to_thread(self.net.add_namespace, node.index, node.address, hosts)
        await self._launch(node)
        return node

    async def disconnect(self, name: str) -> None:
        """Pull the node's cable: its veth goes down; the process keeps running, unreachable."""
        await asyncio.to_thread(self.net.set_link, self.node(name).index, False)

    async def reconnect(self, name: str) -> None:
        """Plug the cable back in."""
        await asyncio.to_thread(self.net.set_link, self.node(name).index, True)

    async def kill_namespace(self, name: str) -> None:
        """The whole "host" goes away: the node is killed and its namespace (and veth) deleted."""
        node = self.node(name)
        await self.kill(name)
        await asyncio.to_thread(self.net.remove_namespace, node.namespace)


async def http_status(url: str, timeout: float = 2.0) -> int:
    """The status code of ``GET url`` (plain HTTP/1.0; enough for the health server), bounded in time."""
    if not url.startswith("http://"):
        raise ValueError(f"only http:// URLs: {url!r}")
    hostport, _, path = url[len("http://") :].partition("/")
    host, _, port = hostport.rpartition(":")
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        try:
            writer.write(f"GET /{path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n".encode())
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"not an HTTP reply from {url}: {status_line!r}")
    return int(parts[1])


# ------------------------------------------------------------------ leftovers at exit
_live: set[NetnsMesh] = set()  # started, not yet closed: strong references, so atexit still sees them


@atexit.register
def _teardown_at_exit() -> None:
    for mesh in list(_live):
        with contextlib.suppress(Exception):
            mesh._teardown_sync()


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m macula_lab.deploy.netns", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a mesh and keep it until Ctrl-C / SIGTERM")
    up.add_argument("--source", choices=SOURCES, default="compose")
    up.add_argument("-n", type=int, default=None, help="number of nodes (k3s: replicas)")
    up.add_argument("--json", metavar="FILE", help="also write the mesh's info (endpoints, ca, token) here")
    up.add_argument("--workdir", help="keep certificates and node homes here (default: a temp dir)")
    up.add_argument("--subnet", help="the nodes' subnet (default: a free /24 of 172.20.0.0/16)")
    up.add_argument("--ready-timeout", type=float, default=30.0)
    down = sub.add_parser("down", help="remove leftovers of runs whose process is gone")
    down.add_argument("--all", action="store_true", help="remove every run, also live ones")
    sub.add_parser("status", help="list runs with something left on this machine")
    sub.add_parser("check", help="say whether network namespaces can be used here")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            reason = unavailable_reason()
            print(reason or "ok: network namespaces are usable")
            return 1 if reason else 0
        if args.command == "status":
            for run, state in netns_ip.runs().items():
                print(f"{run}  {'alive' if state['alive'] else 'stale'}  {json.dumps(state)}")
            return 0
        if args.command == "down":
            for run, problems in clean_stale(everything=args.all).items():
                print(f"removed run {run}" + (f" (problems: {'; '.join(problems)})" if problems else ""))
            return 0
        return asyncio.run(_up(args))
    except MaculaError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


async def _up(args: argparse.Namespace) -> int:
    mesh = NetnsMesh(
        args.n, source=args.source, workdir=args.workdir, subnet=args.subnet, ready_timeout=args.ready_timeout
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with mesh:
        info = json.dumps(mesh.info(), indent=2)
        print(info, flush=True)
        if args.json:
            await asyncio.to_thread(Path(args.json).write_text, info + "\n")
        print("mesh is up; Ctrl-C (or SIGTERM) stops it and removes the namespaces", file=sys.stderr)
        await stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
