"""Every entry point refuses the same bad values with the same named error, and changes nothing.

A value enters through the CLI (and its environment), the Lab, a Node, an
attached client, a widget or the wire.  They all apply the rules of
``core/params.py``: a bad value is :class:`~macula_lab.errors.InvalidField`
naming the field (``invalid_field`` with the field in its details on the
wire), never clamped, never an ``internal_error``, and nothing changes (no
advertisement, no timer).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from macula_lab import Lab, Node, cli, connect
from macula_lab.core.messages import MessageType, new_id
from macula_lab.errors import InvalidField
from macula_lab.transport.certs import lab_certs
from macula_lab.widgets import AdvertisePanel

from .rawpeer import raw_connect, raw_frame
from .widgets.test_base import until

REALM = "com.test.entry"
SERVICE = "svc.entry"
BAD_TTLS = [0, -5, 0.5, math.nan, math.inf, 86401, 172_800]  # 172,800 s: the TTL-over-a-day bug
BAD_TIMEOUTS = [0, -1, math.nan, math.inf, 3601]
BAD_ATTEMPTS = [0, -7, 101]
BAD_NAMES = ["", "a..b", "has space", "x" * 256]


def handler(args):
    return args


@pytest.fixture
async def lab():
    lab = await Lab.start(2, realm=REALM, sample_interval=None)
    yield lab
    await lab.stop()


def nothing_advertised(lab) -> bool:
    return all(n.node.services.ads == {} and n.node.services.live_timers() == [] for n in lab.nodes)


async def refused(attempt, field: str) -> None:
    with pytest.raises(InvalidField) as err:
        await attempt
    assert err.value.field == field, (err.value.field, str(err.value))


async def wire_error(lab, mtype: MessageType, body: dict) -> dict:
    """Send a hand-built frame (our own encoder would refuse it) after a CONNECT; the node's ERROR body."""
    certs = lab_certs(Path(lab.certs_dir), ["raw"], ips=["127.0.0.1"])
    raw = await raw_connect(lab.node("node-1").endpoint, certs)
    try:
        [ack] = await raw.exchange(raw.connect_frame(REALM))
        assert ack.type is MessageType.CONNECT_ACK
        rid = new_id()
        [err] = await raw.exchange(raw_frame(mtype, {"id": rid, **body}))
        assert err.type is MessageType.ERROR and err.body["id"] == rid
        return err.body
    finally:
        raw.close()


# ------------------------------------------------------------------ TTL
async def test_node_lab_client_and_wire_refuse_the_same_ttls(lab):
    client = await lab.attach_client("node-1")
    node = lab.node("node-2")
    for ttl in BAD_TTLS:
        await refused(node.node.advertise(SERVICE, handler, ttl=ttl), "ttl")  # Node
        await refused(node.advertise(SERVICE, handler, ttl=ttl), "ttl")  # Lab
        await refused(client.advertise(SERVICE, handler, ttl=ttl), "ttl")  # attached client
    for ttl in [*BAD_TTLS, "300", True]:  # the wire: what a peer sends, whatever its type
        body = await wire_error(lab, MessageType.ADVERTISE, {"service": SERVICE, "ttl": ttl, "metadata": {}})
        assert body["code"] == "invalid_field" and body.get("details") == {"field": "ttl"}, (ttl, body)
    assert nothing_advertised(lab)


async def test_a_refused_advertise_leaves_the_previous_one_and_its_timer(lab):
    local = lab.node("node-2")
    await local.advertise("svc.kept", handler, ttl=60)
    await refused(local.advertise("svc.kept", handler, ttl=172_800), "ttl")
    services = local.node.services
    assert services.ads["svc.kept"].ttl == 60 and services.live_timers() == ["svc.kept"]


async def test_the_widget_shows_the_same_error_and_never_clamps(lab):
    panel = AdvertisePanel(lab, service=SERVICE)
    try:
        for ttl in [0, 0.5, math.inf, 86401, 172_800]:
            panel.ttl.value = ttl
            assert panel.ttl.value == ttl  # the widget keeps what was typed
            task = panel.advertise()
            await until(task.done, what="the widget's action to finish")
            assert isinstance(panel.last_error, InvalidField) and panel.last_error.field == "ttl"
            assert "ttl" in panel.status.value
    finally:
        panel.close()
    assert nothing_advertised(lab)


@pytest.mark.parametrize("ttl", ["0", "0.5", "nan", "inf", "86401", "172800"])
def test_the_cli_refuses_the_same_ttls(ttl, capsys, monkeypatch):
    monkeypatch.delenv("MACULA_SERVICE_TTL", raising=False)
    code = cli.main(["node", "--name", "n1", "--realm", REALM, "--serve", "a.b=echo", "--service-ttl", ttl])
    assert code == 2
    err = capsys.readouterr().err
    assert "service_ttl" in err and "--service-ttl" in err and "MACULA_SERVICE_TTL" in err


# ------------------------------------------------------------------ timeouts, attempts
async def test_calls_refuse_bad_timeouts_and_attempts_everywhere(lab):
    client = await lab.attach_client("node-1")
    node = lab.node("node-2")
    cases = [("timeout", v) for v in BAD_TIMEOUTS] + [("max_attempts", v) for v in BAD_ATTEMPTS]
    for field, value in cases:
        await refused(node.node.call(SERVICE, {}, **{field: value}), field)
        await refused(node.call(SERVICE, {}, **{field: value}), field)
        await refused(client.call(SERVICE, {}, **{field: value}), field)
        body = await wire_error(lab, MessageType.SERVICE_CALL, {"service": SERVICE, "args": {}, "timeout": 1.0, field: value})
        assert body["code"] == "invalid_field" and body.get("details") == {"field": field}, (field, value, body)


# ------------------------------------------------------------------ names and realms
async def test_bad_service_names_everywhere(lab):
    client = await lab.attach_client("node-1")
    node = lab.node("node-2")
    for name in BAD_NAMES:
        for attempt in (
            node.node.advertise(name, handler),
            node.advertise(name, handler),
            node.call(name, {}),
            client.advertise(name, handler),
            client.call(name, {}),
            client.discover(name),
        ):
            await refused(attempt, "service")
        body = await wire_error(lab, MessageType.DISCOVER, {"service": name, "refresh": False})
        assert body["code"] == "invalid_field" and body.get("details") == {"field": "service"}
    assert nothing_advertised(lab)


async def test_bad_realms_everywhere(capsys):
    for realm in ["", "a..b", "has space"]:
        with pytest.raises(InvalidField) as err:
            Node(name="n1", realm=realm, listen=None)
        assert err.value.field == "realm"
        await refused(Lab.start(1, realm=realm, transport="memory"), "realm")
        await refused(connect("quic://127.0.0.1:9", realm=realm), "realm")
        assert cli.main(["node", "--name", "n1", "--realm", realm]) == 2
        assert "realm" in capsys.readouterr().err
