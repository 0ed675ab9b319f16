"""Shared fixtures: a lab CA with node certificates, real nodes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from macula_lab.certs import lab_certs
from macula_lab.node import Node
from macula_lab.transport.quic import TlsConfig

NAMES = [f"node-{i}" for i in range(1, 9)] + ["client", "raw"]


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
    for node in made:
        with contextlib.suppress(Exception):
            await node.stop()


def other_tasks() -> set[asyncio.Task]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
