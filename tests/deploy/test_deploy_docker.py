"""docker/: the Dockerfile (hadolint), the compose file (compose-spec schema), and what they pass to nodes.

No Docker daemon is needed: the files are linted and validated, and the
environment the compose file gives each node is run by real ``macula-lab node``
processes (on loopback here; in network namespaces, unchanged, in test_netns.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import macula_lab
from macula_lab.deploy.config import config_from_env
from macula_lab.deploy.manifests import ManifestError, compose_nodes, interpolate_compose
from macula_lab.deploy.netns import http_status

from .._deploy import REPO, start_on_loopback, tool

DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
HEALTHCHECK = DOCKER / "healthcheck.py"

pytestmark = pytest.mark.timeout(120)


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# ------------------------------------------------------------------ Dockerfile
def test_dockerfile_passes_hadolint_at_the_strictest_threshold():
    done = run(tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE))
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_really_lints(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD python -m macula_lab\n")
    done = run(tool("hadolint"), str(bad))
    assert done.returncode != 0 and "DL3007" in done.stdout and "DL3008" in done.stdout


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_image_runs_the_node_as_a_non_root_user_with_a_health_check():
    instructions = dockerfile_instructions()
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    ops = dict(final)  # the last of each instruction in the final stage
    assert (
        ops["FROM"].startswith("${PYTHON_IMAGE}")
        and "slim" in dict(instructions)["ARG"] + DOCKERFILE.read_text()
    )
    assert ops["USER"] == "10001:10001"
    assert json.loads(ops["ENTRYPOINT"]) == ["macula-lab", "node"]
    assert "9443/udp" in ops["EXPOSE"] and "8080/tcp" in ops["EXPOSE"]
    healthcheck = ops["HEALTHCHECK"]
    assert "CMD" in healthcheck and "/usr/local/bin/macula-healthcheck" in healthcheck
    assert any(
        op == "COPY" and arg == "docker/healthcheck.py /usr/local/bin/macula-healthcheck" for op, arg in final
    )
    # the image sets no MACULA_* variable: the compose file / StatefulSet carry all of them
    assert "MACULA_" not in " ".join(arg for op, arg in instructions if op == "ENV")


def test_build_context_has_what_the_dockerfile_copies():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    for op, arg in dockerfile_instructions():
        if op == "COPY" and not arg.startswith("--from"):
            for source in arg.split()[:-1]:
                assert (REPO / source).exists(), source
                assert any(source == a.rstrip("/*") or source.startswith(a.rstrip("/*")) for a in allowed), (
                    source
                )


# ------------------------------------------------------------------ the health check script
def healthcheck(listen: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MACULA_HEALTH_LISTEN"}
    if listen is not None:
        env["MACULA_HEALTH_LISTEN"] = listen
    return run(sys.executable, str(HEALTHCHECK), *args, env=env)


async def test_healthcheck_script_follows_the_nodes_readiness(certs):
    from macula_lab.deploy.procs import start_node_process

    d = certs["node-7"].ca.parent
    base = ["--listen", "quic://127.0.0.1:0", "--certs-dir", str(d), "--health-listen", "127.0.0.1:0"]
    ready = await start_node_process("node-7", base)
    # a node whose bootstrap peer never answers is alive but not ready
    lonely = await start_node_process(
        "node-8", [*base, "--bootstrap", "quic://127.0.0.1:9", "--connect-timeout", "0.3"]
    )
    try:
        ok = await asyncio.to_thread(healthcheck, f"0.0.0.0:{ready.health_port}")
        assert ok.returncode == 0 and "ready" in ok.stdout, ok.stdout
        live = await asyncio.to_thread(healthcheck, f"0.0.0.0:{lonely.health_port}", "/live")
        assert live.returncode == 0, live.stdout
        not_ready = await asyncio.to_thread(healthcheck, f"127.0.0.1:{lonely.health_port}")
        assert not_ready.returncode == 1 and "503" in not_ready.stdout, not_ready.stdout
    finally:
        await ready.stop()
        await lonely.stop()
    gone = await asyncio.to_thread(healthcheck, f"0.0.0.0:{ready.health_port}")
    assert gone.returncode == 1 and "unhealthy" in gone.stdout
    off = await asyncio.to_thread(healthcheck, "off")
    assert off.returncode == 0 and "off" in off.stdout
    bad = await asyncio.to_thread(healthcheck, "nonsense")
    assert bad.returncode == 1 and "MACULA_HEALTH_LISTEN" in bad.stdout


# ------------------------------------------------------------------ compose file
def test_compose_file_is_valid_against_the_compose_specification():
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("service", "key", "value"),
    [
        ("node-1", "ports", "9443:9443/udp"),  # a list is required
        ("node-2", "depends_on", {"node-1": {"condition": "when_i_feel_like_it"}}),
        ("node-3", "networks", {"macula": {"ipv4_address": 172}}),
    ],
)
def test_compose_schema_check_really_checks(tmp_path: Path, service: str, key: str, value):
    broken = compose()
    broken["services"][service][key] = value
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))
    assert done.returncode == 1 and service in done.stdout, done.stdout


def test_three_nodes_on_the_seeds_bridge_with_udp_published():
    doc = compose()
    [subnet] = doc["networks"]["macula"]["ipam"]["config"]
    assert subnet["subnet"] == "172.20.0.0/16"
    nodes = compose_nodes()
    assert [n.name for n in nodes] == ["node-1", "node-2", "node-3"]
    assert [n.address for n in nodes] == ["172.20.0.11", "172.20.0.12", "172.20.0.13"]
    for spec in nodes:
        service = doc["services"][spec.name]
        udp = [p for p in service["ports"] if str(p).endswith(":9443/udp")]
        assert len(udp) == 1, f"{spec.name}: QUIC must be published as UDP: {service['ports']}"
        assert spec.mounts == {"/certs": "certs"}
        assert spec.env["MACULA_NAME"] == spec.name and spec.env["MACULA_CERTS_DIR"] == "/certs"
    # the guide: node-1 and node-3 serve math.add; node-2 and node-3 join through node-1
    serves = {n.name: config_from_env(n.env).serve for n in nodes}
    assert serves["node-1"]["math.add"] == serves["node-3"]["math.add"] == "calculator"
    assert serves["node-2"] == {}
    assert [n.env.get("MACULA_BOOTSTRAP") for n in nodes] == [
        None,
        "quic://node-1:9443",
        "quic://node-1:9443",
    ]
    assert nodes[1].after == nodes[2].after == ("node-1",)
    jupyter = doc["services"]["jupyter"]
    assert jupyter["profiles"] == ["lab"] and "MACULA_ENDPOINTS" in jupyter["environment"]


def test_the_certs_job_issues_each_node_its_names_and_address():
    script = interpolate_compose(compose()["services"]["certs"]["command"][0], {})  # $$ -> $
    issued = dict(re.findall(r"(node-\d+)=(\d+\.\d+\.\d+\.\d+)", script))
    assert issued == {n.name: n.address for n in compose_nodes()}
    assert "macula-lab certs init --dir /certs" in script and "--dns" in script and "--ip" in script


def test_the_certs_job_script_passes_shellcheck(tmp_path: Path):
    script = tmp_path / "certs.sh"
    script.write_text(
        "#!/bin/sh\nset -e\n" + interpolate_compose(compose()["services"]["certs"]["command"][0], {})
    )
    done = run(tool("shellcheck"), str(script))
    assert done.returncode == 0, done.stdout


def test_the_podman_scripts_pass_shellcheck():
    # docker/podman-packages.sh (what tests/deploy/test_containers.py needs) and the CI entry point that runs it
    done = run(tool("shellcheck"), str(DOCKER / "podman-packages.sh"), str(REPO / ".ci" / "run"))
    assert done.returncode == 0, done.stdout


def test_every_node_env_is_a_valid_node_configuration():
    for spec in compose_nodes():
        config = config_from_env(spec.env).validate()
        assert config.realm == "com.test.lab" and config.admin_token == "macula-lab-admin"
    # compose interpolation: the shell environment overrides the defaults
    [node1, *_] = compose_nodes(environ={"MACULA_REALM": "io.other", "MACULA_SERVICE_TTL": "30"})
    assert node1.env["MACULA_REALM"] == "io.other" and config_from_env(node1.env).service_ttl == 30


def test_compose_interpolation_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert (
        interpolate_compose("${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $$HOME", env) == "v v d d  $HOME"
    )
    assert interpolate_compose("${SET:+alt}${UNSET:+alt}", env) == "alt"
    with pytest.raises(ManifestError, match="MUST is required: give it"):
        interpolate_compose("${MUST:?give it}", env)


async def test_nodes_started_with_the_compose_env_form_the_seeds_mesh(tmp_path: Path):
    specs = compose_nodes()
    async with start_on_loopback(specs, tmp_path / "certs") as procs:
        for p in procs.values():
            assert (
                await http_status(f"http://{p.endpoint.split('//')[1].split(':')[0]}:{p.health_port}/ready")
                == 200
            )
        assert procs["node-2"].contacts >= 1 and procs["node-3"].contacts >= 1
        client = await macula_lab.connect(
            procs["node-2"].endpoint, realm="com.test.lab", certs=str(tmp_path / "certs")
        )
        try:
            reply = await client.call("math.add", {"operation": "add", "a": 10, "b": 5}, timeout=3)
            assert reply in ({"result": 15, "node": "node-1"}, {"result": 15, "node": "node-3"})
            snapshot = await client.inspect("macula-lab-admin", ["node"])  # the compose file's admin token
            assert snapshot["node"]["name"] == "node-2"
        finally:
            await client.close()


def test_reading_the_files_fails_with_named_errors(tmp_path: Path):
    [node1, *_] = compose_nodes()
    assert node1.with_mounts({"certs": "/x"}).env["MACULA_CERTS_DIR"] == "/x"
    with pytest.raises(ManifestError, match="no host directory for volume 'certs' at /certs"):
        node1.with_mounts({})
    odd = tmp_path / "compose.yaml"
    odd.write_text("services:\n  n:\n    labels: [io.macula.lab.role=node]\n    entrypoint: [sleep, '1']\n")
    with pytest.raises(ManifestError, match="overrides the entrypoint"):
        compose_nodes(odd)
    odd.write_text("services:\n  web:\n    image: nginx\n")
    with pytest.raises(ManifestError, match="no service labelled io.macula.lab.role: node"):
        compose_nodes(odd)
    with pytest.raises(ManifestError, match="cannot read"):
        compose_nodes(tmp_path / "missing.yaml")
