"""Multi-host runs in network namespaces: nodes configured by docker/compose.yaml and the k3s StatefulSet.

Real ``macula-lab node`` processes, each in a namespace of its own behind a
bridge; this process attaches from the root namespace.  Skipped without root.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import macula_lab
from macula_lab.deploy import netns_ip
from macula_lab.deploy.netns import NetnsError, NetnsMesh, http_status

from ..strict import skip_or_fail

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]


def leftovers(run: str) -> list[str]:
    """Everything of ``run`` still on the machine (namespaces, links, hosts files, state file)."""
    found = netns_ip.list_namespaces(run) + netns_ip.list_links(run)
    found += [str(p) for p in netns_ip.NETNS_ETC.glob(f"mlab-{run}-*")]
    state = netns_ip.STATE_DIR / f"{run}.json"
    return found + ([str(state)] if state.exists() else [])


TTL = "30"  # the services' TTL in these meshes: re-advertised every 24 s instead of 240 s


@pytest.fixture
def netns_overrides() -> dict[str, str]:
    """Scaled-down service TTL for every mesh of this module (see ``converged``)."""
    return {"MACULA_SERVICE_TTL": TTL}


async def converged(client, service: str, providers: set[str], timeout: float = 10.0) -> None:
    """Wait until a fresh lookup finds ``providers``.

    Right after nodes join the DHT is only eventually consistent: a node answers
    a lookup from its own replica, and a record stored before the others joined
    (node-1 advertises while alone) reaches a newcomer by handover only when the
    holder sees no closer contact; otherwise at the next re-advertisement (80 %
    of the TTL).  Procedures make the same wait before asserting on providers.
    """
    found: set[str] = set()
    async with asyncio.timeout(timeout):
        while found != providers:
            found = {p.metadata["node"] for p in await client.discover(service, refresh=True)}
            if found != providers:
                await asyncio.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


async def test_compose_nodes_serve_math_add_to_a_lab_in_the_root_namespace(netns_mesh: NetnsMesh):
    mesh = netns_mesh
    assert mesh.names == ["node-1", "node-2", "node-3"]
    assert mesh.realm == "com.test.lab" and mesh.token == "macula-lab-admin"  # the compose file's values
    subnet = mesh.net.subnet
    assert subnet.subnet_of(netns_ip.BASE_NETWORK)
    assert [ep.rsplit(".", 1)[1] for ep in mesh.endpoints] == ["11:9443", "12:9443", "13:9443"]
    node2 = mesh.node("node-2")
    assert node2.advertised == "quic://node-2:9443"  # peers dial it by the compose host name
    assert (mesh.node("node-1").serves, node2.serves) == (["math.add", "test.calculator"], [])
    for name in mesh.names:
        assert await http_status(mesh.health_url(name, "/ready"), timeout=2) == 200

    client = await macula_lab.connect(node2.endpoint, realm=mesh.realm, certs=mesh.certs)
    try:
        # the testing guide's container option: node-2 discovers math.add through the DHT and calls it
        await converged(client, "math.add", {"node-1", "node-3"})
        seen = set()
        for i in range(6):
            reply = await client.call("math.add", {"a": 50, "b": i}, strategy="round_robin", timeout=2)
            assert reply["result"] == 50 + i
            seen.add(reply["node"])
        assert seen == {"node-1", "node-3"}
        providers = await client.discover("math.add")
        assert sorted(p.endpoint for p in providers) == ["quic://node-1:9443", "quic://node-3:9443"]
        assert await client.call("test.calculator", {"operation": "mul", "a": 6, "b": 7}, timeout=2) in (
            {"result": 42, "node": "node-1"},
            {"result": 42, "node": "node-3"},
        )
    finally:
        await client.close()
    info = mesh.info()
    assert info["endpoints"] == mesh.endpoints and info["nodes"]["node-3"]["namespace"].startswith("mlab-")
    assert mesh.attach_args() == {
        "urls": mesh.endpoints,
        "realm": mesh.realm,
        "certs": mesh.certs,  # the CA and the lab's client certificate (lab.pem): sessions need both
        "token": mesh.token,
    }


async def test_calls_fail_over_when_a_providers_namespace_dies_mid_run(netns_mesh: NetnsMesh):
    mesh = netns_mesh
    client = await macula_lab.connect(mesh.endpoint("node-2"), realm=mesh.realm, certs=mesh.certs)
    await converged(client, "math.add", {"node-1", "node-3"})
    served: list[tuple[int, str]] = []  # (call number, provider)
    halfway = asyncio.Event()
    killed_at: list[int] = []

    async def caller(worker: int) -> None:
        for i in range(15):
            reply = await client.call("math.add", {"a": worker, "b": i}, strategy="round_robin", timeout=1.0)
            assert reply["result"] == worker + i
            served.append((len(served), reply["node"]))
            if len(served) >= 12:
                halfway.set()

    async def fault() -> None:
        await halfway.wait()
        killed_at.append(len(served))
        await mesh.kill_namespace("node-1")  # calls are in flight from three workers

    try:
        await asyncio.gather(caller(0), caller(1), caller(2), fault())
        events = (await client.inspect(mesh.token, ["events"]))["events"]
    finally:
        await client.close()
    before = {node for n, node in served[: killed_at[0]]}
    after = [node for n, node in served[killed_at[0] + 3 :]]  # three calls may have been answered in flight
    assert before == {"node-1", "node-3"}, served
    assert len(served) == 45 and after and set(after) == {"node-3"}, served  # not one call failed
    failovers = [e for e in events if e["kind"] == "failover" and e["service"] == "math.add"]
    assert failovers and {e["detail"]["provider"] for e in failovers} == {"node-1"}, events
    assert mesh.node("node-1").namespace not in netns_ip.list_namespaces(mesh.net.run)


async def test_killed_node_restarts_and_is_discovered_again(netns_mesh: NetnsMesh):
    mesh = netns_mesh
    pid = mesh.node("node-3").process.pid
    assert await mesh.kill("node-3") == -9
    assert not mesh.node("node-3").running and not alive(pid)
    with pytest.raises((OSError, TimeoutError)):
        await http_status(mesh.health_url("node-3", "/live"), timeout=1)
    node = await mesh.start_node("node-3")
    assert node.running and node.process.pid != pid
    client = await macula_lab.connect(mesh.endpoint("node-2"), realm=mesh.realm, certs=mesh.certs)
    try:
        await converged(client, "math.add", {"node-1", "node-3"})
        assert (await client.call("math.add", {"a": 1, "b": 1}, strategy="round_robin", timeout=2))[
            "result"
        ] == 2
    finally:
        await client.close()
    assert "ready" in node.log_text() and len(node.history) > 0  # the first process's output is kept


async def test_disconnect_makes_a_node_unreachable_until_reconnected(netns_mesh: NetnsMesh):
    mesh = netns_mesh
    url = mesh.health_url("node-3", "/live")
    await mesh.disconnect("node-3")
    with pytest.raises((OSError, TimeoutError)):
        await http_status(url, timeout=0.5)
    assert mesh.node("node-3").running  # the process lives on, unreachable
    await mesh.reconnect("node-3")
    assert await http_status(url, timeout=3) == 200


@pytest.mark.parametrize("netns_mesh", ["k3s"], indirect=True)
async def test_statefulset_env_makes_a_mesh_through_stable_dns_names(netns_mesh: NetnsMesh):
    mesh = netns_mesh
    assert mesh.names == ["macula-0", "macula-1", "macula-2"]
    fqdn = "macula-1.macula-headless.macula-test.svc.cluster.local"
    assert mesh.node("macula-1").advertised == f"quic://{fqdn}:9443"
    assert len(mesh.token) == 32  # generated, handed to the pods as the Secret's admin-token
    client = await macula_lab.connect(mesh.endpoint("macula-1"), realm=mesh.realm, certs=mesh.certs)
    try:
        await converged(client, "math.add", set(mesh.names))  # every pod serves
        seen = {
            (await client.call("math.add", {"a": i, "b": i}, strategy="round_robin", timeout=2))["node"]
            for i in range(6)
        }
        assert seen == set(mesh.names)
        snapshot = await client.inspect(mesh.token, ["node"])
        assert snapshot["node"]["name"] == "macula-1"
    finally:
        await client.close()


async def test_everything_is_removed_even_when_the_body_fails(netns_available):
    mesh = NetnsMesh(2, source="compose")
    with pytest.raises(RuntimeError, match="boom"):
        async with mesh:
            run, workdir = mesh.net.run, mesh.workdir
            pids = [node.process.pid for node in mesh.nodes.values()]
            assert leftovers(run) and all(alive(p) for p in pids)
            raise RuntimeError("boom")
    assert leftovers(run) == [] and not workdir.exists()
    assert not any(alive(p) for p in pids)


async def test_a_node_that_never_gets_ready_fails_start_with_its_log_and_cleans_up(
    netns_available, tmp_path: Path
):
    compose = tmp_path / "compose.yaml"
    compose.write_text(
        textwrap.dedent(
            """
            services:
              lonely:
                labels: {io.macula.lab.role: node}
                environment:
                  MACULA_NAME: lonely
                  MACULA_LISTEN: quic://0.0.0.0:9443
                  MACULA_CERTS_DIR: /certs
                  MACULA_BOOTSTRAP: quic://nobody.invalid:9443
                  MACULA_CONNECT_TIMEOUT: "0.5"
                volumes: ["certs:/certs:ro"]
            """
        )
    )
    mesh = NetnsMesh(source="compose", compose_file=compose, ready_timeout=3)
    with pytest.raises(NetnsError, match=r"lonely not ready .* within 3s") as info:
        await mesh.start()
    assert "nobody.invalid" in str(info.value)  # the node's own log explains it
    assert leftovers(mesh.net.run) == []


async def test_leftovers_of_a_crashed_run_are_removed_and_live_runs_are_not(netns_mesh: NetnsMesh):
    # a process that builds a network and dies without cleaning up (as under SIGKILL)
    crash = textwrap.dedent(
        """
        import os
        from macula_lab.deploy.netns_ip import Network
        net = Network()
        net.create()
        net.add_namespace(0, net.address(11), [])
        print(net.run, flush=True)
        os._exit(9)
        """
    )
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", crash], capture_output=True, text=True, timeout=30
    )
    run = done.stdout.strip()
    assert done.returncode == 9 and run and leftovers(run), done.stderr
    assert netns_ip.runs()[run]["alive"] is False and netns_ip.runs()[netns_mesh.net.run]["alive"] is True
    removed = netns_ip.clean_stale()
    assert removed.get(run) == [] and netns_mesh.net.run not in removed
    assert leftovers(run) == []
    assert await http_status(netns_mesh.health_url("node-1", "/ready"), timeout=2) == 200  # untouched


async def test_parallel_meshes_get_their_own_subnets(netns_mesh_factory):
    # (one pod alone never gets ready: it bootstraps through the StatefulSet's other pods)
    a, b = await asyncio.gather(netns_mesh_factory(1), netns_mesh_factory(2, source="k3s"))
    assert a.net.subnet != b.net.subnet and not a.net.subnet.overlaps(b.net.subnet)
    for mesh in (a, b):
        assert await http_status(mesh.health_url(mesh.names[0], "/ready"), timeout=2) == 200


def test_unavailable_reason_names_what_is_missing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in netns_ip.unavailable_reason()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns_ip.shutil, "which", lambda name: None)
    assert "iproute2" in netns_ip.unavailable_reason()


def test_command_line_check_status_and_down():
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "macula_lab.deploy.netns", *args], capture_output=True, text=True, timeout=60
        )

    reason = netns_ip.unavailable_reason()
    done = cli("check")
    assert done.returncode == (1 if reason else 0) and (reason or "usable") in done.stdout
    if reason:
        skip_or_fail(f"network namespaces unavailable: {reason}")
    assert cli("status").returncode == 0
    assert cli("down").returncode == 0  # removes stale runs only: live runs of parallel tests survive


async def test_an_interpreter_exiting_without_close_still_removes_its_mesh(netns_available):
    script = textwrap.dedent(
        """
        import asyncio
        from macula_lab.deploy.netns import NetnsMesh

        async def main():
            mesh = await NetnsMesh(1).start()          # never closed
            print(mesh.net.run, mesh.node("node-1").process.pid, flush=True)

        asyncio.run(main())
        """
    )
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    run, pid = done.stdout.split()
    assert done.returncode == 0, done.stderr
    assert leftovers(run) == [] and not alive(int(pid))  # the atexit hook


async def test_command_line_up_serves_until_sigterm_then_cleans_up(netns_available, tmp_path: Path):
    info_file = tmp_path / "mesh.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "macula_lab.deploy.netns", "up", "-n", "2", "--json", str(info_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            while not info_file.exists() or not info_file.read_text().endswith("}\n"):
                assert proc.returncode is None, (await proc.stderr.read()).decode()
                await asyncio.sleep(0.1)
        info = json.loads(info_file.read_text())
        assert list(info["nodes"]) == ["node-1", "node-2"] and info["token"] == "macula-lab-admin"
        client = await macula_lab.connect(info["endpoints"][1], realm=info["realm"], certs=info["certs"])
        try:
            assert (await client.call("math.add", {"a": 2, "b": 3}, timeout=2)) == {
                "result": 5,
                "node": "node-1",
            }
        finally:
            await client.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(30):
            await proc.wait()
    assert proc.returncode == 0
    assert leftovers(info["run"]) == [] and not await asyncio.to_thread(Path(info["ca"]).exists)


async def test_a_chosen_subnet_is_used_and_a_taken_one_refused(netns_mesh_factory):
    mesh = await netns_mesh_factory(1, subnet="10.233.7.0/24")
    assert mesh.endpoints == ["quic://10.233.7.11:9443"]
    with pytest.raises(NetnsError, match="overlaps"):
        await netns_mesh_factory(1, subnet="10.233.7.0/24")
