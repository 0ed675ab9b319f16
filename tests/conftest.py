"""Shared fixtures: a lab CA with node certificates, real nodes on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from macula_lab.runtime.node import Node
from macula_lab.transport.certs import issue_client_cert, lab_certs
from macula_lab.transport.quic import TlsConfig

from .strict import fail_skipped

pytest_plugins = ["tests.fixtures_netns"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under MACULA_STRICT=1 every skip (mark, fixture, importorskip, pytest.skip) is a failure."""
    outcome = yield
    fail_skipped(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a module skipped at import (``pytest.importorskip`` at module level)."""
    outcome = yield
    fail_skipped(outcome.get_result())

NAMES = [f"node-{i}" for i in range(1, 41)] + ["raw"]


def _make_certs(d) -> dict:
    """Node certificates valid for 127.0.0.1 (where test nodes listen), and a client certificate."""
    made = lab_certs(d, NAMES, ips=["127.0.0.1"])
    made["client"] = issue_client_cert(d, "client")
    made["client2"] = issue_client_cert(d, "client2")
    return made


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """One lab CA and a certificate per node name (EC P-256: fast to make), plus ``client``."""
    return _make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def foreign_certs(tmp_path_factory):
    """Certificates from another CA: peers must refuse them."""
    return _make_certs(tmp_path_factory.mktemp("foreign-certs"))


def tls_for(certs, name: str, **kw) -> TlsConfig:
    return TlsConfig.from_node_cert(certs[name], **kw)


def client_args(certs, name: str = "client") -> dict:
    """``connect`` / ``Lab.attach`` keyword arguments for an attached client holding ``certs[name]``."""
    c = certs[name]
    return {"ca": str(c.ca), "cert": str(c.cert), "key": str(c.key)}


@pytest.fixture
async def nodes(certs) -> AsyncIterator:
    """Factory for started QUIC nodes on loopback port 0; all are stopped at teardown."""
    made: list[Node] = []

    async def make(name: str, *, realm: str = "com.test.lab", tls=None, **kw) -> Node:
        node = Node(name=name, realm=realm, tls=tls or tls_for(certs, name), **kw)
        made.append(node)
        return await node.start()

    yield make
    await stop_all(made)


async def stop_all(nodes, timeout: float = 20.0) -> None:
    """Stop nodes; if that hangs, fail with every pending task's stack (a hang is a bug)."""
    try:
        await asyncio.wait_for(asyncio.gather(*(n.stop() for n in nodes)), timeout)
    except TimeoutError:
        import io

        out = io.StringIO()
        for task in other_tasks():
            task.print_stack(file=out)
        raise AssertionError(
            f"stopping nodes hung for {timeout}s; pending tasks:\n{out.getvalue()}"
        ) from None


def other_tasks() -> set[asyncio.Task]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


@pytest.fixture
async def node_processes(certs):
    """Factory: three ``macula-lab node`` processes on loopback (node-1..3), the nodes of an attached lab.

    ``await node_processes(realm, token)``; all are stopped (SIGTERM) at teardown.
    """
    from macula_lab.deploy.procs import start_node_process

    started = []

    async def start(realm: str, token: str | None = None, names=("node-1", "node-2", "node-3")):
        args = [
            "--listen",
            "quic://127.0.0.1:0",
            "--realm",
            realm,
            "--certs-dir",
            str(certs[names[0]].ca.parent),
        ]
        args += ["--health-listen", "off", *(["--admin-token", token] if token else [])]
        first = await start_node_process(names[0], args)
        started.append(first)
        rest = await asyncio.gather(
            *(start_node_process(n, [*args, "--bootstrap", first.endpoint]) for n in names[1:]),
            return_exceptions=True,
        )
        started.extend(p for p in rest if not isinstance(p, BaseException))
        for p in rest:
            if isinstance(p, BaseException):
                raise p
        return [first, *rest]

    yield start
    await asyncio.gather(*(p.stop() for p in started))
