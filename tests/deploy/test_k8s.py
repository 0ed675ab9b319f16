"""Finding the node pods through the Kubernetes API (macula_lab.deploy.k8s).

There is no cluster here.  The real ``kubernetes`` client talks to a small local
HTTP server that answers ``GET /api/v1/namespaces/<ns>/pods`` with a PodList
shaped like the API server's reply for ``k3s/nodes/statefulset.yaml``'s pods
(the pod template from the file, plus the fields the StatefulSet controller and
the kubelet fill in: name, hostname, subdomain, IP, phase, Ready condition).
So the client's request building, authentication header, JSON decoding into
``V1Pod`` models, and our selection of ready pods are all exercised; what a
real API server would add (admission, watch semantics) is not.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from macula_lab.deploy import k8s
from macula_lab.errors import InvalidEndpoint

kubernetes = pytest.importorskip("kubernetes")

REPO = Path(__file__).resolve().parents[2]
STATEFULSET = yaml.safe_load((REPO / "k3s/nodes/statefulset.yaml").read_text())
TOKEN = "sa-token-123"


def statefulset_pod(ordinal: int, *, ready: bool = True, phase: str = "Running", deleting: bool = False):
    """A pod of the StatefulSet as the API server returns it (JSON, camelCase)."""
    template = copy.deepcopy(STATEFULSET["spec"]["template"])
    name = f"{STATEFULSET['metadata']['name']}-{ordinal}"
    metadata = {
        **template["metadata"],
        "name": name,
        "namespace": "macula-test",
        "uid": f"uid-{ordinal}",
        "labels": {**template["metadata"]["labels"], "statefulset.kubernetes.io/pod-name": name},
    }
    if deleting:
        metadata["deletionTimestamp"] = "2025-01-10T10:00:00Z"
    spec = {**template["spec"], "hostname": name, "subdomain": STATEFULSET["spec"]["serviceName"]}
    status = {
        "phase": phase,
        "podIP": f"10.42.0.{10 + ordinal}",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    return {"metadata": metadata, "spec": spec, "status": status}


class FakeApiServer:
    """Answers the pod list; records every request (method, path, query, auth)."""

    def __init__(self, pods: list[dict], *, status: int = 200, delay: float = 0.0):
        self.pods, self.status, self.delay = pods, status, delay
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                server.requests.append(
                    {
                        "method": "GET",
                        "path": url.path,
                        "query": parse_qs(url.query),
                        "auth": self.headers.get("Authorization"),
                    }
                )
                time.sleep(server.delay)
                if server.status != 200:
                    body = {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "code": server.status,
                        "reason": "Forbidden",
                        "message": 'pods is forbidden: User "x" cannot list resource "pods"',
                    }
                else:
                    body = {
                        "kind": "PodList",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": "1"},
                        "items": server.pods,
                    }
                data = json.dumps(body).encode()
                try:
                    self.send_response(server.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout test)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def api(self):
        config = kubernetes.client.Configuration(host=self.url)
        config.api_key = {"authorization": TOKEN}
        config.api_key_prefix = {"authorization": "Bearer"}
        return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(config))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer([statefulset_pod(2), statefulset_pod(0), statefulset_pod(1, ready=False)])
    yield server
    server.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MACULA_ENDPOINTS", "MACULA_NAMESPACE", "MACULA_POD_SELECTOR", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)


def test_ready_pods_become_stable_dns_endpoints(api_server: FakeApiServer):
    endpoints = k8s.find_node_endpoints_sync(api=api_server.api())
    assert endpoints == [  # ordinal order; macula-1 is not ready
        "quic://macula-0.macula-headless.macula-test.svc.cluster.local:9443",
        "quic://macula-2.macula-headless.macula-test.svc.cluster.local:9443",
    ]
    # the endpoints are exactly what the pods advertise (the StatefulSet's MACULA_ADVERTISE)
    env = {e["name"]: e.get("value") for e in STATEFULSET["spec"]["template"]["spec"]["containers"][0]["env"]}
    advertised = (
        env["MACULA_ADVERTISE"].replace("$(POD_NAME)", "macula-0").replace("$(POD_NAMESPACE)", "macula-test")
    )
    assert endpoints[0] == advertised
    [request] = api_server.requests
    assert request["path"] == "/api/v1/namespaces/macula-test/pods"
    assert request["query"]["labelSelector"] == [k8s.DEFAULT_SELECTOR]
    assert request["auth"] == f"Bearer {TOKEN}"


def test_pod_ip_endpoints_and_other_namespace(api_server: FakeApiServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MACULA_NAMESPACE", "lab")
    monkeypatch.setenv("MACULA_POD_SELECTOR", "app=x")
    assert k8s.find_node_endpoints_sync(api=api_server.api(), address="ip") == [
        "quic://10.42.0.10:9443",
        "quic://10.42.0.12:9443",
    ]
    assert api_server.requests[0]["path"] == "/api/v1/namespaces/lab/pods"
    assert api_server.requests[0]["query"]["labelSelector"] == ["app=x"]


def test_the_role_allows_exactly_the_request_made(api_server: FakeApiServer):
    k8s.find_node_endpoints_sync(api=api_server.api())
    docs = list(yaml.safe_load_all((REPO / "k3s/jupyter/rbac.yaml").read_text()))
    [role] = [d for d in docs if d["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    # a GET on the pods collection of one namespace is the "list" verb on "pods" in the core group
    assert {(r["method"], r["path"].rsplit("/", 1)[-1]) for r in api_server.requests} == {("GET", "pods")}
    assert all(r["path"].startswith("/api/v1/namespaces/") for r in api_server.requests)


def test_no_ready_pod_is_a_named_error_listing_the_waiting_ones():
    server = FakeApiServer(
        [
            statefulset_pod(0, ready=False),
            statefulset_pod(1, phase="Pending"),
            statefulset_pod(2, deleting=True),
        ]
    )
    try:
        with pytest.raises(k8s.NoNodePods, match=r"macula-0 \(Running\), macula-1 \(Pending\), macula-2"):
            k8s.find_node_endpoints_sync(api=server.api())
    finally:
        server.close()
    empty = FakeApiServer([])
    try:
        with pytest.raises(k8s.NoNodePods, match="no pod at all"):
            k8s.find_node_endpoints_sync(api=empty.api())
    finally:
        empty.close()


def test_forbidden_names_the_rbac_it_needs():
    server = FakeApiServer([], status=403)
    try:
        with pytest.raises(k8s.K8sError, match=r"403 .*needs `list` on pods"):
            k8s.find_node_endpoints_sync(api=server.api())
    finally:
        server.close()


async def test_a_slow_api_server_times_out_with_a_named_error():
    server = FakeApiServer([statefulset_pod(0)], delay=1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(k8s.K8sError, match="timed out after 0.3s"):
            await k8s.find_node_endpoints(api=server.api(), timeout=0.3)
        assert time.monotonic() - t0 < 0.6  # the whole search, not each of the client's retries
        with pytest.raises(k8s.K8sError, match=r"timed out: .*Read timed out"):
            k8s.find_node_endpoints_sync(api=server.api(), timeout=0.1)  # each request: 0.1 s
    finally:
        server.close()


def test_kubeconfig_file_is_used(api_server: FakeApiServer, tmp_path: Path):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "k3s", "cluster": {"server": api_server.url}}],
                "users": [{"name": "lab", "user": {"token": TOKEN}}],
                "contexts": [{"name": "lab", "context": {"cluster": "k3s", "user": "lab"}}],
                "current-context": "lab",
            }
        )
    )
    assert len(k8s.find_node_endpoints_sync(kubeconfig=str(kubeconfig))) == 2
    assert api_server.requests[0]["auth"] == f"Bearer {TOKEN}"


def test_missing_kubeconfig_is_a_named_error(tmp_path: Path):
    with pytest.raises(k8s.K8sError, match="no usable Kubernetes configuration"):
        k8s.find_node_endpoints_sync(kubeconfig=str(tmp_path / "nope"))


def test_given_endpoints_win_and_are_normalised(monkeypatch: pytest.MonkeyPatch):
    assert k8s.find_node_endpoints_sync("k3s-host:30443, quic://[fd00::1]") == [
        "quic://k3s-host:30443",
        "quic://[fd00::1]:9443",
    ]
    monkeypatch.setenv("MACULA_ENDPOINTS", "quic://node-1:9443,quic://node-2:9443")
    assert k8s.find_node_endpoints_sync() == ["quic://node-1:9443", "quic://node-2:9443"]
    with pytest.raises(InvalidEndpoint, match="bad node endpoint"):
        k8s.endpoints_from(["quic://ok:1", "ftp://nope"])
    with pytest.raises(InvalidEndpoint, match="no endpoint"):
        k8s.endpoints_from(" , ")


def test_pod_without_stable_name_needs_ip_addressing():
    pod = kubernetes.client.V1Pod(
        metadata=kubernetes.client.V1ObjectMeta(name="loose", namespace="macula-test"),
        spec=kubernetes.client.V1PodSpec(containers=[kubernetes.client.V1Container(name="node")]),
        status=kubernetes.client.V1PodStatus(phase="Running", pod_ip="fd00::7"),
    )
    with pytest.raises(k8s.K8sError, match="address='ip'"):
        k8s.pod_endpoint(pod)
    assert k8s.pod_endpoint(pod, address="ip") == "quic://[fd00::7]:9443"  # no named UDP port: 9443


def test_in_cluster_without_a_service_account_is_a_named_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.43.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(k8s.K8sError, match="no usable Kubernetes configuration"):
        k8s.load_api()  # no /var/run/secrets/kubernetes.io/serviceaccount/token here


def test_without_the_kubernetes_package_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(__import__("sys").modules, "kubernetes", None)  # import fails
    with pytest.raises(k8s.K8sError, match=r"macula-lab\[k8s\].*MACULA_ENDPOINTS"):
        k8s.find_node_endpoints_sync(namespace="macula-test")
    assert k8s.find_node_endpoints_sync(["quic://a:1"]) == ["quic://a:1"]  # given endpoints need no client
