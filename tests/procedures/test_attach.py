"""Endpoints from compose service names, pods and hosts; attaching waits for nodes."""

from __future__ import annotations

import pytest

from macula_lab.procedures.attach import (
    NoEndpoints,
    as_list,
    attach_lab,
    compose_endpoints,
    host_endpoints,
    k8s_endpoints,
)


async def test_lists_and_endpoints():
    assert as_list("a, b c") == ["a", "b", "c"] and as_list(None) == [] and as_list(["x"]) == ["x"]
    assert compose_endpoints(["node-1", "node-2"]) == ["quic://node-1:9443", "quic://node-2:9443"]
    assert host_endpoints("beam00.lab, beam01.lab:9444, quic://10.0.0.5:1", port=9443) == [
        "quic://beam00.lab:9443",
        "quic://beam01.lab:9444",
        "quic://10.0.0.5:1",
    ]
    assert await k8s_endpoints(pods=["10.42.0.7", "10.42.0.8"]) == [
        "quic://10.42.0.7:9443",
        "quic://10.42.0.8:9443",
    ]


async def test_attach_needs_endpoints_and_gives_up_in_time():
    with pytest.raises(NoEndpoints):
        await attach_lab([], realm="r")
    with pytest.raises(Exception, match="could not attach"):
        await attach_lab("quic://127.0.0.1:9", realm="r", insecure=True, timeout=1.5)
