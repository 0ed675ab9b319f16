"""One service scenario, one test body, both transports: the runtime takes the same path on each.

Advertise from a node and from an attached client (relayed by its node),
discover both from another node, call through the attached client, then kill
the provider a caller picks first and see the call fail over to the other.
"""

from __future__ import annotations

import pytest

from macula_lab import Lab

SERVICE = "svc.scenario"


@pytest.fixture(params=["quic", "memory"])
async def lab(request):
    # short per-attempt timeouts: a dead provider costs one of them
    lab = await Lab.start(n=4, transport=request.param, realm="com.test.scenario", sample_interval=None)
    yield lab
    await lab.stop()


async def test_advertise_discover_call_through_a_client_and_fail_over(lab):
    client = await lab.attach_client("node-2", name="client-1")
    assert client.name == "client-1" and client.endpoint == lab.node("node-2").endpoint
    served_in_client = []

    def from_client(args):
        served_in_client.append(args)  # runs in this process, relayed by node-2
        return {"from": "client-1", "echo": args}

    assert await lab.node("node-1").advertise(SERVICE, lambda a: {"from": "node-1", "echo": a}) >= 1
    assert await client.advertise(SERVICE, from_client) >= 1

    providers = await lab.node("node-4").discover(SERVICE, refresh=True)
    by_name = {p.metadata["node"]: p for p in providers}
    assert set(by_name) == {"node-1", "node-2"}, providers
    assert by_name["node-2"].metadata["client"] == "client-1"  # published by the node it is attached to

    res = await client.call(SERVICE, {"x": 1}, strategy="first")
    assert res.value["echo"] == {"x": 1} and res.value["from"] in ("node-1", "client-1")
    # node-2's own provider is the relay: the call crosses back over the client's session
    relayed = await lab.node("node-2").call(SERVICE, {"x": 0}, strategy="local_first")
    assert relayed.value == {"from": "client-1", "echo": {"x": 0}} and served_in_client[-1] == {"x": 0}

    # the provider "first" picks is killed; the next call fails over to the other one
    first = await lab.node("node-4").call(SERVICE, {"x": 2}, strategy="first")
    victim = first.provider
    survivor = {"node-1": "client-1", "node-2": "node-1"}[victim]
    await lab.kill_node(victim)
    res = await lab.node("node-4").call(SERVICE, {"x": 3}, strategy="first", timeout=1.0)
    assert res.value == {"from": survivor, "echo": {"x": 3}}
    assert [a.provider for a in res.attempts] == [victim, res.provider]
    assert res.attempts[0].error and "Timeout" in res.attempts[0].error
    if survivor == "client-1":
        assert served_in_client[-1] == {"x": 3}
