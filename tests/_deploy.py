"""Helpers for the deployment tests: tools from the test venv, and nodes on loopback with a file's env.

:func:`start_on_loopback` runs the nodes a deployment file describes as real
``macula-lab node`` processes given the file's environment (no ``--name`` or
other flags), with one mapping so they fit on one machine without namespaces:
every host name the file uses for a node in a ``host:port``, and the wildcard
listen address, become that node's own loopback address (``127.X.Y.11``, ``.12``, ...; a random
``/24`` of ``127.0.0.0/8`` per call, so ports stay those of the file).  Mounted
volumes point at a certificate directory whose certificates carry those
addresses.  The network-namespace tests run the same env without any mapping.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from macula_lab.deploy.manifests import NodeSpec
from macula_lab.deploy.procs import NodeProcess, wait_ready
from macula_lab.transport.certs import ensure_ca, issue_client_cert, issue_node_cert

from .strict import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A command-line tool installed with the test extra (next to this python), else on PATH; else skip.

    (Under MACULA_STRICT=1 a missing tool fails the test.)
    """
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        skip_or_fail(f"{name} is not installed (pip install -e '.[test]')")
    return str(path)


def loopback_map(specs: list[NodeSpec]) -> dict[str, str]:
    """Node name -> a loopback address of a random 127.X.Y.0/24."""
    x, y = random.randint(1, 254), random.randint(1, 254)
    return {spec.name: f"127.{x}.{y}.{11 + i}" for i, spec in enumerate(specs)}


def map_to_loopback(spec: NodeSpec, addresses: dict[str, str], specs: list[NodeSpec]) -> NodeSpec:
    """``spec`` with host names of every node and the wildcard address replaced (see module docstring)."""
    names = sorted(((h, addresses[s.name]) for s in specs for h in s.hostnames), key=lambda kv: -len(kv[0]))
    own = addresses[spec.name]

    def rewrite(value: str) -> str:
        # only hosts of host:port pairs (listen, advertise, bootstrap, health): names stay names
        value = re.sub(r"(?<![\w.-])0\.0\.0\.0(?=:\d)", own, value)
        for host, address in names:
            value = re.sub(rf"(?<![\w.-]){re.escape(host)}(?=:\d)", address, value)
        return value

    return NodeSpec(
        name=spec.name,
        env={k: rewrite(v) for k, v in spec.env.items()},
        args=tuple(rewrite(a) for a in spec.args),
        hostnames=spec.hostnames,
        address=own,
        mounts=spec.mounts,
        after=spec.after,
    )


@asynccontextmanager
async def start_on_loopback(specs: list[NodeSpec], certs_dir: Path) -> AsyncIterator[dict[str, NodeProcess]]:
    """Start every node of ``specs`` (dependencies first), yield ``name -> NodeProcess``; always stop them."""
    addresses = loopback_map(specs)
    ensure_ca(certs_dir)
    issue_client_cert(certs_dir, "lab")  # who attaches: tests connect with certs=certs_dir
    procs: dict[str, NodeProcess] = {}
    mapped = []
    for spec in specs:
        m = map_to_loopback(spec, addresses, specs).with_mounts(
            {v: str(certs_dir) for v in spec.mounts.values()}
        )
        name = m.env.get("MACULA_NAME") or spec.name
        issue_node_cert(certs_dir, name, ips=[addresses[spec.name]])
        mapped.append(m)
    try:
        pending = list(mapped)
        while pending:
            wave = [m for m in pending if all(d in procs for d in m.after if d in addresses)]
            assert wave, f"dependency cycle among {[m.name for m in pending]}"
            started = await asyncio.gather(*(_start(m) for m in wave))
            procs.update(zip((m.name for m in wave), started, strict=True))
            pending = [m for m in pending if m not in wave]
        yield procs
    finally:
        await asyncio.gather(*(p.stop() for p in procs.values()))


async def _start(spec: NodeSpec) -> NodeProcess:
    env = {k: os.environ[k] for k in ("PATH", "LANG", "PYTHONPATH", "VIRTUAL_ENV") if k in os.environ}
    env.update(spec.env)
    env["HOSTNAME"] = spec.hostnames[0]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "macula_lab", "node", *spec.args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )  # fmt: skip
    return await wait_ready(NodeProcess(spec.name, proc), timeout=30)
