"""k3s/monitoring/: the Prometheus rules (promtool), the Grafana dashboard, and a real Prometheus alerting.

- ``promtool check rules`` / ``check config`` / ``test rules`` on the shipped files
  (Debian's ``prometheus`` package, installed by ``.ci/run``; skipped without it);
- every metric the rules and the dashboard use is exported by a node's ``/metrics``
  (or recorded by a rule), and the dashboard draws the testing guide's metrics;
- a real Prometheus server (the Debian package, started here on loopback with the
  shipped ``prometheus.yaml``, its targets replaced and its intervals shortened)
  scrapes three nodes in network namespaces (docker/compose.yaml's), and
  ``MaculaServiceNoProvider`` fires when the only provider of a service is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

import macula_lab
from macula_lab.runtime.node import Node

from .._deploy import REPO

MONITORING = REPO / "k3s" / "monitoring"
RULES = MONITORING / "prometheus"
DASHBOARD = MONITORING / "grafana" / "macula-lab.json"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return path


def run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)


def rules() -> list[dict]:
    out = []
    for name in ("alerts.yaml", "recording.yaml"):
        for group in yaml.safe_load((RULES / name).read_text())["groups"]:
            out += group["rules"]
    return out


# ------------------------------------------------------------------ promtool
def test_promtool_checks_the_rules_and_the_compose_config():
    tool = promtool()
    done = run(tool, "check", "rules", "alerts.yaml", "recording.yaml", cwd=RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 11 rules found" in done.stdout and "SUCCESS: 19 rules found" in done.stdout
    done = run(tool, "check", "config", "prometheus.yaml", cwd=RULES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_rules_pass():
    done = run(promtool(), "test", "rules", "tests/rules_test.yaml", cwd=RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_really_test(tmp_path: Path):
    """A broken threshold makes the shipped unit tests fail (they are not vacuous)."""
    tool = promtool()
    copy = tmp_path / "prometheus"
    shutil.copytree(RULES, copy)
    alerts = copy / "alerts.yaml"
    alerts.write_text(alerts.read_text().replace("macula_ready == 0", "macula_ready == 2"))
    done = run(tool, "test", "rules", "tests/rules_test.yaml", cwd=copy)
    assert done.returncode != 0 and "MaculaNodeNotReady" in done.stdout + done.stderr


def test_every_alert_has_severity_summary_and_description():
    alerts = [r for r in rules() if "alert" in r]
    names = {r["alert"] for r in alerts}
    assert {
        "MaculaServiceNoProvider",
        "MaculaReadvertiseLate",
        "MaculaLookupFailures",
        "MaculaLookupLatencyHigh",
        "MaculaCacheHitRatioCollapse",
        "MaculaNodeNotReady",
        "MaculaNodeDown",
    } <= names
    for rule in alerts:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


# ------------------------------------------------------- metrics exist on /metrics
def metric_names(expr: str) -> set[str]:
    """Metric and recorded-series names used by a PromQL expression (macula_*, macula:*, process_*, up)."""
    return set(re.findall(r"\b((?:macula[_:]|process_)[a-zA-Z0-9_:]+|up)\b(?=\s*[{\[)\s*=<>!*/+-]|$)", expr))


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


async def exported_families(nodes_factory) -> set[str]:
    """Every sample name a node with an advertisement, a call and a lookup exports on /metrics."""
    a: Node = await nodes_factory("node-1", health_listen="127.0.0.1:0")
    b: Node = await nodes_factory("node-2", bootstrap=[a.endpoint], health_listen="127.0.0.1:0")
    await a.advertise("math.add", lambda args: args)
    await b.call("math.add", {"a": 1})
    names: set[str] = set()
    for node in (a, b):  # the provider, and the caller (cache, lookups, provider selection)
        reader, writer = await asyncio.open_connection("127.0.0.1", node.health_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = (await reader.read()).decode()
        writer.close()
        names |= {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line and line[0] != "#"}
    return names


async def test_rules_and_dashboard_use_only_metrics_a_node_exports_or_a_rule_records(nodes):
    exported = await exported_families(nodes)
    recorded = {r["record"] for r in rules() if "record" in r}
    known = exported | recorded | {"up"}
    for m in list(exported):  # histogram families: the _bucket/_sum/_count samples
        for suffix in ("_bucket", "_sum", "_count"):
            if m.endswith(suffix):
                known.add(m[: -len(suffix)])
    used: dict[str, set[str]] = {}
    for rule in rules():
        used.setdefault(rule.get("alert") or rule["record"], set()).update(metric_names(rule["expr"]))
    for i, expr in enumerate(dashboard_exprs()):
        used.setdefault(f"dashboard target {i}", set()).update(metric_names(expr))
    missing = {where: names - known for where, names in used.items() if names - known}
    assert not missing, f"not exported by /metrics nor recorded: {missing}"
    # the metrics the alerts are about really are there
    assert {
        "macula_service_advertised",
        "macula_readvertise_lateness_seconds",
        "macula_service_ttl_seconds",
        "macula_dht_providers",
        "macula_discovery_cache_hits_total",
        "macula_dht_query_duration_seconds_bucket",
        "macula_rpc_rtt_seconds_bucket",
        "macula_dht_lookups_total",
        "macula_ready",
        "process_resident_memory_bytes",
    } <= exported


def test_dashboard_draws_the_testing_guides_metrics():
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for metric in (
        "dht query latency",
        "cache hit ratio",
        "re-advertisement",
        "provider",
        "round trip",
        "memory",
    ):
        assert metric in titles, metric
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "macula-lab"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]


def test_compose_monitoring_profile_leaves_the_default_up_unchanged():
    doc = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = doc["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
    default = sorted(n for n, s in services.items() if not s.get("profiles"))
    assert default == ["certs", "node-1", "node-2", "node-3"]
    mounts = services["prometheus"]["volumes"][0].split(":")
    assert (REPO / "docker" / mounts[0]).resolve() == RULES
    config = yaml.safe_load((RULES / "prometheus.yaml").read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "macula"  # MaculaNodeDown's up{job="macula"}
    assert [t for c in job["static_configs"] for t in c["targets"]] == [
        "node-1:8080",
        "node-2:8080",
        "node-3:8080",
    ]


# ---------------------------------------------------- a real Prometheus, real alerts
SCRAPE = "1s"
FOR = "2s"  # every alert's `for`, shortened (the shipped ones are minutes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.loads(reply.read())


class PrometheusServer:
    """Debian's prometheus on 127.0.0.1, the shipped config with other targets and intervals."""

    def __init__(self, workdir: Path, targets: dict[str, str]):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load((RULES / "prometheus.yaml").read_text())
        config["global"] = {
            "scrape_interval": SCRAPE,
            "scrape_timeout": SCRAPE,
            "evaluation_interval": SCRAPE,
        }
        files = []
        for name in config["rule_files"]:
            doc = yaml.safe_load((RULES / name).read_text())
            for group in doc["groups"]:
                for rule in group["rules"]:
                    if "for" in rule:
                        rule["for"] = FOR
            (workdir / name).write_text(yaml.safe_dump(doc))
            files.append(str(workdir / name))
        config["rule_files"] = files
        [job] = config["scrape_configs"]
        job["static_configs"] = [{"targets": [t], "labels": {"node": n}} for n, t in targets.items()]
        (workdir / "prometheus.yaml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    async def start(self, timeout: float = 30.0) -> None:
        self.proc = self._spawn()
        await self.until(self._ready, timeout, "Prometheus did not become ready")

    def _spawn(self) -> subprocess.Popen:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed"
        with self.log.open("wb") as log:
            return subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.workdir / 'prometheus.yaml'}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    async def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        doc = await asyncio.to_thread(get_json, f"{self.url}/api/v1/{path}{query}")
        assert doc["status"] == "success", doc
        return doc["data"]

    async def query(self, expr: str) -> list[dict]:
        return (await self.api("query", query=expr))["result"]

    async def alerts(self, name: str, state: str = "firing") -> list[dict]:
        found = (await self.api("alerts"))["alerts"]
        return [a for a in found if a["labels"]["alertname"] == name and a["state"] == state]

    @staticmethod
    async def until(check, timeout: float, what: str, interval: float = 0.2):
        """Poll ``check`` (sync or async) until it returns something truthy; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} within {timeout:g}s")
            await asyncio.sleep(interval)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_real_prometheus_fires_no_provider_when_the_only_provider_is_killed(
    netns_mesh_factory, tmp_path: Path, record_property
):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (Debian package prometheus; .ci/run installs it)")
    # MACULA_NETNS_SUBNET: where a compose network already holds 172.20.0.0/16 (podman, docker)
    mesh = await netns_mesh_factory(source="compose", subnet=os.environ.get("MACULA_NETNS_SUBNET"))
    targets = {}
    for name in mesh.names:
        url = urllib.parse.urlsplit(mesh.health_url(name, "/metrics"))
        targets[name] = url.netloc
    server = PrometheusServer(tmp_path, targets)
    # node-1 becomes the only provider of watch.me (a lab attached to it advertises it, as node-1)
    client = await macula_lab.connect(mesh.endpoint("node-1"), realm=mesh.realm, certs=mesh.certs)
    try:
        await client.advertise("watch.me", lambda args: args, ttl=300)
        await server.start()

        async def watched() -> bool:
            up = await server.query('up{job="macula"} == 1')
            advertised = await server.query('macula_service_advertised{service="watch.me"}')
            return len(up) == 3 and len(advertised) == 1

        await server.until(watched, 60, "Prometheus did not scrape the three nodes and watch.me")
        assert await server.alerts("MaculaServiceNoProvider", "firing") == []
        assert await server.alerts("MaculaServiceNoProvider", "pending") == []

        killed_at = time.monotonic()
        await mesh.kill("node-1")

        async def fired() -> list[dict]:
            return [
                a
                for a in await server.alerts("MaculaServiceNoProvider")
                if a["labels"]["service"] == "watch.me"
            ]

        [alert] = await server.until(fired, 60, "MaculaServiceNoProvider did not fire for watch.me")
        elapsed = time.monotonic() - killed_at
        record_property("kill_to_firing_s", round(elapsed, 2))
        print(f"\nMaculaServiceNoProvider firing {elapsed:.2f} s after the kill (scrape {SCRAPE}, for {FOR})")
        assert alert["labels"]["severity"] == "critical" and alert["labels"]["realm"] == mesh.realm
        assert "No provider of watch.me" in alert["annotations"]["summary"]
        # node-3 still provides math.add: no alert for it; node-1 is reported down
        assert [
            a for a in await server.alerts("MaculaServiceNoProvider") if a["labels"]["service"] != "watch.me"
        ] == []
        down = await server.until(
            lambda: server.alerts("MaculaNodeDown"), 30, "MaculaNodeDown did not fire for node-1"
        )
        assert [a["labels"]["node"] for a in down] == ["node-1"]
    finally:
        server.stop()
        await client.close()
