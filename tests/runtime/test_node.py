"""Node runtime: lifecycle, task ownership, handlers, automatic certificates."""

from __future__ import annotations

import asyncio

import pytest

from macula_lab.runtime.node import Node

from ..conftest import other_tasks
from ..timing import eventually


async def test_node_owns_its_tasks(nodes):
    a = await nodes("node-1")
    started = asyncio.Event()

    async def forever():
        started.set()
        await asyncio.sleep(3600)

    task = a.spawn(forever(), name="forever")
    await started.wait()
    assert task in a.tasks
    await a.stop()
    assert task.cancelled() and not a.tasks


async def test_failed_background_task_is_logged_not_lost(nodes, caplog):
    a = await nodes("node-1")

    async def broken():
        raise RuntimeError("kaput")

    a.spawn(broken(), name="broken")
    await eventually(lambda: "background task broken failed" in caplog.text, 5)
    assert "kaput" in caplog.text


async def test_procedures_can_be_replaced(nodes):
    a = await nodes("node-1")
    b = await nodes("node-2")

    async def v1(args, peer):
        return 1

    async def v2(args, peer):
        return 2

    b.procedure("t.v", v1)
    assert await a.call_procedure(b.endpoint, "t.v") == 1
    b.procedure("t.v", v2)
    assert await a.call_procedure(b.endpoint, "t.v") == 2


async def test_certs_directory_issues_a_certificate(tmp_path):
    before = other_tasks()
    a = Node(name="auto-1", certs=tmp_path)
    b = Node(name="auto-2", certs=tmp_path)
    async with a, b:
        assert (tmp_path / "ca.pem").exists() and (tmp_path / "auto-1.pem").exists()
        assert await a.ping(b.endpoint) > 0
    await eventually(lambda: other_tasks() - before == set(), 5, "no task left")


def test_node_id_validation():
    with pytest.raises(ValueError, match="32 bytes"):
        Node(node_id=b"short", listen=None)
    with pytest.raises(ValueError, match="hex"):
        Node(node_id="zz", listen=None)
    n = Node(node_id="ab" * 32, listen=None, name="x")
    assert n.node_id == b"\xab" * 32
    assert "stopped" in repr(n)


async def test_stop_before_start_is_harmless():
    n = Node(listen=None)
    await n.stop()
    assert not n.running
