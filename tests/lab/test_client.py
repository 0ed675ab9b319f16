"""Attached clients: the node API from a process that is not a mesh node."""

from __future__ import annotations

import asyncio

import pytest

import macula_lab
from macula_lab.deploy.procs import start_node_process
from macula_lab.errors import CertificateError, RealmMismatch
from macula_lab.runtime.gateway import ServiceOwnedElsewhere
from macula_lab.runtime.services import AllProvidersFailed, RemoteError, ServiceNotFound

from ..conftest import client_args

REALM = "com.test.attach"


async def _until(predicate, timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_client_handler_runs_in_the_client_and_is_withdrawn_on_disconnect(nodes, certs):
    n1 = await nodes("node-1", realm=REALM)
    n2 = await nodes("node-2", realm=REALM, bootstrap=[n1.endpoint])
    client = await macula_lab.connect(n1.endpoint, realm=REALM, **client_args(certs), name="notebook")
    calls = []

    def handler(args):
        calls.append(args)
        return {"sum": args["a"] + args["b"], "served_by": "notebook"}

    assert await client.advertise("lab.sum", handler, ttl=30) >= 1
    assert await n2.call("lab.sum", {"a": 2, "b": 3}) == {"sum": 5, "served_by": "notebook"}
    assert calls == [{"a": 2, "b": 3}]
    [provider] = await n2.discover("lab.sum", refresh=True)
    assert provider.node_id == n1.node_id  # the entry names the node the client is attached to
    assert provider.metadata["client"] == "notebook"

    await client.close()

    async def gone():
        return await n2.discover("lab.sum", refresh=True) == []

    assert await _until(gone), "the node did not withdraw the client's advertisement"
    assert n1.gateway.clients == {}
    with pytest.raises(ServiceNotFound):
        await n2.call("lab.sum", {"a": 1, "b": 1})


async def test_client_discovers_and_calls_through_its_node(nodes, certs):
    n1 = await nodes("node-1", realm=REALM)
    n2 = await nodes("node-2", realm=REALM, bootstrap=[n1.endpoint])
    await n2.advertise(
        "math.add", lambda a: {"result": a["a"] + a["b"], "node": "node-2"}, metadata={"node": "node-2"}
    )
    async with await macula_lab.connect(n1.endpoint, realm=REALM, **client_args(certs)) as client:
        [p] = await client.discover("math.add")
        assert p.node_id == n2.node_id and p.metadata["node"] == "node-2" and p.live(client.host.now())
        res = await client.call("math.add", {"a": 50, "b": 7}, details=True)
        assert res.value == {"result": 57, "node": "node-2"} and res.provider == "node-2"
        with pytest.raises(ServiceNotFound):
            await client.call("math.missing")


async def test_errors_keep_their_names_across_the_session(nodes, certs):
    n1 = await nodes("node-1", realm=REALM)
    n2 = await nodes("node-2", realm=REALM, bootstrap=[n1.endpoint])

    def broken(args):
        raise KeyError("boom")

    client = await macula_lab.connect(n1.endpoint, realm=REALM, **client_args(certs))
    try:
        await client.advertise("lab.broken", broken)
        for caller in (n2, client):
            with pytest.raises(RemoteError) as err:
                await caller.call("lab.broken", {})
            assert err.value.remote_type == "KeyError" and "boom" in err.value.remote_message
    finally:
        await client.close()


async def test_client_unadvertises_its_own_service(nodes, certs):
    n1 = await nodes("node-1", realm=REALM)
    n2 = await nodes("node-2", realm=REALM, bootstrap=[n1.endpoint])
    client = await macula_lab.connect(n1.endpoint, realm=REALM, **client_args(certs))
    try:
        await client.advertise("lab.mine", lambda a: "mine")
        assert await n2.call("lab.mine") == "mine"
        assert await client.unadvertise("lab.mine") >= 1  # replicas that removed the record
        assert "lab.mine" not in client.advertised
        assert "lab.mine" not in n1.services.ads and "lab.mine" not in n1.services.live_timers()
        assert await n2.discover("lab.mine", refresh=True) == []
        with pytest.raises(ServiceNotFound):
            await n2.call("lab.mine", timeout=0.5)
        await client.advertise("lab.mine", lambda a: "again")  # the name is free again
        assert await n2.call("lab.mine") == "again"
    finally:
        await client.close()


async def test_a_service_is_relayed_for_one_client_at_a_time(nodes, certs):
    n1 = await nodes("node-1", realm=REALM)
    c1 = await macula_lab.connect(n1.endpoint, realm=REALM, **client_args(certs))
    c2 = await macula_lab.connect(n1.endpoint, realm=REALM, **client_args(certs, "client2"))
    try:
        await c1.advertise("lab.one", lambda a: 1)
        with pytest.raises(ServiceOwnedElsewhere) as err:  # rebuilt by the client from the node's ERROR
            await c2.advertise("lab.one", lambda a: 2)
        assert err.value.code == "service_owned_elsewhere"
        assert await c2.unadvertise("lab.one") == 0  # not c2's to withdraw
        assert await c2.call("lab.one") == 1
    finally:
        await c1.close()
        await c2.close()


async def test_a_short_session_with_the_same_certificate_does_not_take_the_calls(nodes, certs):
    """A diagnose probe holds the lab's certificate too: its session opening and closing
    beside the one that advertised must not make calls to the lab's handler fail."""
    n1 = await nodes("node-1", realm=REALM)
    n2 = await nodes("node-2", realm=REALM, bootstrap=[n1.endpoint])
    lab_client = await macula_lab.connect(n1.endpoint, realm=REALM, **client_args(certs))
    try:
        await lab_client.advertise("lab.kept", lambda a: "from the lab")
        for _ in range(3):
            probe = await macula_lab.connect(n1.endpoint, realm=REALM, **client_args(certs), name="probe")
            await probe.close()
            assert await n2.call("lab.kept", {}, timeout=3.0) == "from the lab"
    finally:
        await lab_client.close()


async def test_a_client_certificate_beside_the_ca_is_found(nodes, certs, tmp_path):
    """Deployments hand out ca.pem, lab.pem and lab.key together: ``ca=`` alone is enough."""
    import shutil

    c = certs["client"]
    shutil.copy(c.ca, tmp_path / "ca.pem")
    n1 = await nodes("node-1", realm=REALM)
    with pytest.raises(CertificateError):  # no client certificate anywhere: refused
        await macula_lab.connect(n1.endpoint, realm=REALM, ca=str(tmp_path / "ca.pem"))
    shutil.copy(c.cert, tmp_path / "lab.pem")
    shutil.copy(c.key, tmp_path / "lab.key")
    async with await macula_lab.connect(n1.endpoint, realm=REALM, ca=str(tmp_path / "ca.pem")) as client:
        assert client.node_id == c.node_id  # the identity lab.pem binds


async def test_connect_refuses_wrong_realm_and_foreign_ca(nodes, certs, foreign_certs):
    n1 = await nodes("node-1", realm=REALM)
    with pytest.raises(RealmMismatch):
        await macula_lab.connect(n1.endpoint, realm="com.other", **client_args(certs))
    with pytest.raises(CertificateError):
        await macula_lab.connect(n1.endpoint, realm=REALM, **client_args(foreign_certs))


async def test_attach_to_node_processes(certs):
    """A notebook-style client attached to nodes running as separate processes."""
    d = certs["node-5"].ca.parent
    common = [
        "--listen",
        "quic://127.0.0.1:0",
        "--realm",
        REALM,
        "--certs-dir",
        str(d),
        "--health-listen",
        "off",
    ]
    p1 = await start_node_process("node-5", common)
    p2 = await start_node_process("node-6", [*common, "--bootstrap", p1.endpoint])
    server = await macula_lab.connect(p1.endpoint, realm=REALM, **client_args(certs), name="server")
    caller = await macula_lab.connect(p2.endpoint, realm=REALM, **client_args(certs, "client2"), name="caller")
    try:
        await server.advertise("proc.square", lambda a: a["x"] ** 2)
        assert await caller.call("proc.square", {"x": 12}) == 144
        await server.close()

        async def gone():
            try:
                await caller.call("proc.square", {"x": 1}, timeout=1.0)
            except ServiceNotFound:
                return True
            except AllProvidersFailed:  # the withdrawal has not reached the caller's cache yet
                return False
            return False

        assert await _until(gone, 10), "node-5 kept relaying for a closed client"
    finally:
        await caller.close()
        await server.close()
        assert [await p.stop() for p in (p1, p2)] == [0, 0]
