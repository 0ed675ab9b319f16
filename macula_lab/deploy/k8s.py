"""Find the mesh nodes of a k3s (Kubernetes) deployment, or take their endpoints as given.

    from macula_lab.deploy.k8s import find_node_endpoints
    endpoints = await find_node_endpoints()                 # in a notebook (async, bounded in time)
    endpoints = find_node_endpoints_sync(namespace="macula-test")
    lab = await Lab.attach(endpoints, realm="com.test.lab", ca="/certs/ca.pem", token=...)

Where the endpoints come from, first match wins:

1. ``endpoints=`` (a list, or a comma/space separated string), e.g. the
   NodePort from outside the cluster: ``"quic://k3s-host:30443"``;
2. the ``MACULA_ENDPOINTS`` variable (the compose JupyterLab service sets it);
3. the Kubernetes API: the pods matching ``selector`` in ``namespace`` (the one
   request is ``GET /api/v1/namespaces/<ns>/pods?labelSelector=...``, which is
   what ``k3s/jupyter/rbac.yaml``'s Role allows: ``list`` on ``pods``, nothing
   else).  Only running, ready pods that are not being deleted count.  Each pod
   becomes ``quic://<hostname>.<subdomain>.<ns>.svc.<cluster domain>:<port>``
   (its stable StatefulSet name, which its certificate carries), or
   ``quic://<pod IP>:<port>`` with ``address="ip"``; the port is the
   container's UDP port named ``quic`` (9443 if none).

Defaults: ``namespace`` from ``MACULA_NAMESPACE``, else the pod's own
namespace in a cluster, else ``macula-test``; ``selector`` from
``MACULA_POD_SELECTOR``, else the StatefulSet's labels.  The API is reached
with the in-cluster service account when running in a pod, else the kubeconfig
(``kubeconfig=``/``context=`` or ``$KUBECONFIG``); or pass ``api=`` (a
``kubernetes.client.CoreV1Api``).  The ``kubernetes`` package is imported only
when the API is used: ``pip install 'macula-lab[k8s]'``.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..core.endpoint import DEFAULT_PORT, parse_endpoint
from ..errors import InvalidEndpoint, MaculaError

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_SELECTOR",
    "K8sError",
    "default_namespace",
    "NoNodePods",
    "endpoints_from",
    "find_node_endpoints",
    "find_node_endpoints_sync",
    "list_node_pods",
    "load_api",
    "pod_endpoint",
    "pod_ready",
]

DEFAULT_NAMESPACE = "macula-test"
DEFAULT_SELECTOR = "app.kubernetes.io/name=macula,app.kubernetes.io/component=node"
DEFAULT_TIMEOUT = 10.0
CLUSTER_DOMAIN = "cluster.local"
PORT_NAME = "quic"
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_SPLIT = re.compile(r"[\s,]+")


class K8sError(MaculaError):
    """The Kubernetes API could not be asked (no config, refused, forbidden, timed out)."""

    code = "k8s_error"


class NoNodePods(K8sError):
    """No running, ready pod matches the selector."""

    code = "no_node_pods"


# ------------------------------------------------------------------ given endpoints
def endpoints_from(value: str | Iterable[str]) -> list[str]:
    """Normalised ``quic://host:port`` endpoints from a list or a comma/space separated string."""
    items = _SPLIT.split(value) if isinstance(value, str) else [str(v) for v in value]
    endpoints = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            endpoints.append(str(parse_endpoint(item)))
        except InvalidEndpoint as exc:
            raise InvalidEndpoint(f"bad node endpoint {item!r}: {exc}") from None
    if not endpoints:
        raise InvalidEndpoint(f"no endpoint in {value!r}")
    return endpoints


# ------------------------------------------------------------------ pods -> endpoints
def pod_ready(pod: Any) -> bool:
    """Running, condition Ready=True, and not being deleted."""
    status = pod.status
    if pod.metadata.deletion_timestamp is not None or status is None or status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def _quic_port(pod: Any, port_name: str) -> int:
    for container in pod.spec.containers or []:
        for port in container.ports or []:
            if port.name == port_name and (port.protocol or "TCP") == "UDP":
                return int(port.container_port)
    return DEFAULT_PORT


def pod_endpoint(
    pod: Any,
    *,
    address: str = "dns",
    port_name: str = PORT_NAME,
    cluster_domain: str = CLUSTER_DOMAIN,
) -> str:
    """The endpoint of one pod (a ``kubernetes.client.V1Pod``); see the module docstring."""
    port = _quic_port(pod, port_name)
    name = pod.metadata.name
    if address == "ip":
        if not pod.status or not pod.status.pod_ip:
            raise K8sError(f"pod {name} has no IP yet")
        host = pod.status.pod_ip
        return str(parse_endpoint(f"quic://{f'[{host}]' if ':' in host else host}:{port}"))
    if address != "dns":
        raise ValueError(f"address must be 'dns' or 'ip', got {address!r}")
    spec = pod.spec
    if not spec.hostname or not spec.subdomain:
        raise K8sError(
            f"pod {name} has no stable DNS name (hostname/subdomain are set for StatefulSet pods "
            f"with a serviceName); use address='ip'"
        )
    namespace = pod.metadata.namespace
    return f"quic://{spec.hostname}.{spec.subdomain}.{namespace}.svc.{cluster_domain}:{port}"


# ------------------------------------------------------------------ the API
def _client() -> Any:
    try:
        import kubernetes
    except ImportError:
        raise K8sError(
            "finding pods needs the kubernetes client: pip install 'macula-lab[k8s]' "
            "(or pass endpoints=... / set MACULA_ENDPOINTS)"
        ) from None
    return kubernetes


def load_api(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A ``CoreV1Api``: the in-cluster service account in a pod, else the kubeconfig."""
    kubernetes = _client()
    config = kubernetes.config
    try:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            return kubernetes.client.CoreV1Api()
        api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
    except (config.ConfigException, OSError, TypeError, ValueError) as exc:
        raise K8sError(f"no usable Kubernetes configuration: {exc}") from None
    return kubernetes.client.CoreV1Api(api_client)


def default_namespace() -> str:
    if os.environ.get("MACULA_NAMESPACE"):
        return os.environ["MACULA_NAMESPACE"]
    try:
        return SA_NAMESPACE_FILE.read_text().strip() or DEFAULT_NAMESPACE
    except OSError:
        return DEFAULT_NAMESPACE


def list_node_pods(
    namespace: str | None = None,
    selector: str | None = None,
    *,
    api: Any = None,
    timeout: float = DEFAULT_TIMEOUT,
    kubeconfig: str | None = None,
    context: str | None = None,
) -> list[Any]:
    """The pods (``V1Pod``) matching ``selector`` in ``namespace``, by name; raises :class:`K8sError`."""
    namespace = namespace or default_namespace()
    selector = selector or os.environ.get("MACULA_POD_SELECTOR") or DEFAULT_SELECTOR
    api = api or load_api(kubeconfig, context)
    kubernetes = _client()
    import urllib3  # the client's HTTP library: its errors are timeouts, refused connections...

    try:
        pods = api.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=timeout)
    except kubernetes.client.ApiException as exc:
        hint = ""
        if exc.status == 403:
            hint = " (the service account needs `list` on pods in this namespace: k3s/jupyter/rbac.yaml)"
        raise K8sError(
            f"listing pods in {namespace} ({selector}) failed: {exc.status} {exc.reason}{hint}"
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        kind = "timed out" if "timeout" in f"{type(exc).__name__} {exc}".lower() else "failed"
        raise K8sError(
            f"listing pods in {namespace} ({selector}) {kind}: {type(exc).__name__}: {exc}"
        ) from None
    return sorted(pods.items, key=lambda p: _ordinal_key(p.metadata.name))


def _ordinal_key(name: str) -> tuple[str, int]:
    base, _, ordinal = name.rpartition("-")
    return (base, int(ordinal)) if ordinal.isdigit() else (name, -1)


def find_node_endpoints_sync(
    endpoints: str | Iterable[str] | None = None,
    *,
    namespace: str | None = None,
    selector: str | None = None,
    address: str = "dns",
    api: Any = None,
    timeout: float = DEFAULT_TIMEOUT,
    kubeconfig: str | None = None,
    context: str | None = None,
    cluster_domain: str = CLUSTER_DOMAIN,
) -> list[str]:
    """Node endpoints: given, from ``MACULA_ENDPOINTS``, or from the ready pods (module docstring).

    ``timeout`` applies to each HTTP request (the client retries failed ones).
    """
    if endpoints is not None:
        return endpoints_from(endpoints)
    if os.environ.get("MACULA_ENDPOINTS", "").strip():
        return endpoints_from(os.environ["MACULA_ENDPOINTS"])
    pods = list_node_pods(
        namespace, selector, api=api, timeout=timeout, kubeconfig=kubeconfig, context=context
    )
    ready = [p for p in pods if pod_ready(p)]
    if not ready:
        namespace = namespace or default_namespace()
        selector = selector or os.environ.get("MACULA_POD_SELECTOR") or DEFAULT_SELECTOR
        waiting = ", ".join(f"{p.metadata.name} ({p.status.phase if p.status else '?'})" for p in pods)
        raise NoNodePods(
            f"no ready pod matches {selector} in namespace {namespace}"
            + (f"; not ready: {waiting}" if waiting else "; no pod at all (is the StatefulSet applied?)")
        )
    return [pod_endpoint(p, address=address, cluster_domain=cluster_domain) for p in ready]


async def find_node_endpoints(
    endpoints: str | Iterable[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT, **options: Any
) -> list[str]:
    """:func:`find_node_endpoints_sync` off the event loop (the client blocks); ``timeout`` bounds it all.

    (The synchronous twin applies ``timeout`` to each HTTP request, which the
    client retries up to three times; here the whole search is cut off at
    ``timeout`` and the abandoned request finishes in its worker thread.)
    """
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.to_thread(find_node_endpoints_sync, endpoints, timeout=timeout, **options)
    except TimeoutError:
        raise K8sError(f"finding the node pods timed out after {timeout:g}s") from None
