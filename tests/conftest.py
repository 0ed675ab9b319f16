"""Shared fixtures: a lab CA with node certificates, real nodes on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from macula_lab.certs import lab_certs
from macula_lab.node import Node
from macula_lab.transport.quic import TlsConfig

pytest_plugins = ["tests.fixtures_netns"]

NAMES = [f"node-{i}" for i in range(1, 41)] + ["client", "raw"]


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """One lab CA and a certificate per node name (EC P-256: fast to make)."""
    d = tmp_path_factory.mktemp("certs")
    return lab_certs(d, NAMES)


@pytest.fixture(scope="session")
def foreign_certs(tmp_path_factory):
    """Certificates from another CA: peers must refuse them."""
    d = tmp_path_factory.mktemp("foreign-certs")
    return lab_certs(d, NAMES)


def tls_for(certs, name: str, **kw) -> TlsConfig:
    return TlsConfig.from_node_cert(certs[name], **kw)


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
