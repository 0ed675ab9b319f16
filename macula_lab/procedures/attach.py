"""Endpoints of nodes running elsewhere, from what a deployment option knows about them.

- Option 2 (Docker Compose): service names -> ``quic://node-1:9443`` (the
  compose network's DNS; from the host use the published addresses instead);
- Option 3 (k3s): pods found by label (``macula_lab.k8s`` when installed, else
  ``kubectl get pods -l ... -o json``), or pod addresses given;
- Option 4 (hosts): ``beam00.lab``, ``beam00.lab:9443`` or full URLs.

:func:`attach_lab` attaches with retries, so a notebook started together with
its nodes waits for them (bounded by ``timeout``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..errors import MaculaError

if TYPE_CHECKING:
    from ..lab import Lab

DEFAULT_PORT = 9443


class NoEndpoints(MaculaError):
    code = "no_endpoints"


def as_list(value: str | Iterable[str] | None) -> list[str]:
    """A list from a list, or a comma/space separated string (papermill parameters are often strings)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    return [str(v) for v in value]


def host_endpoints(hosts: str | Iterable[str], port: int = DEFAULT_PORT) -> list[str]:
    out = []
    for host in as_list(hosts):
        if "://" in host:
            out.append(host)
        elif host.count(":") == 1 or host.startswith("["):
            out.append(f"quic://{host}")
        else:
            out.append(f"quic://{host}:{port}")
    return out


compose_endpoints = host_endpoints  # compose service names are host names on the compose network


def k8s_endpoints(
    namespace: str = "macula",
    selector: str = "app.kubernetes.io/name=macula,app.kubernetes.io/component=node",
    port: int = DEFAULT_PORT,
    *,
    pods: str | Iterable[str] | None = None,
    kubeconfig: str | None = None,
) -> list[str]:
    """Pods given (names or addresses), else the running pods matching ``selector``."""
    given = as_list(pods)
    if given:
        return host_endpoints(given, port)
    try:
        from .. import k8s  # the deployments' helper, when present
    except ImportError:
        k8s = None
    if k8s is not None and hasattr(k8s, "pod_endpoints"):
        return list(
            k8s.pod_endpoints(namespace=namespace, selector=selector, port=port, kubeconfig=kubeconfig)
        )
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise NoEndpoints("no pods given and no kubectl on PATH: pass pods=[...] or endpoints=[...]")
    cmd = [kubectl, "get", "pods", "-n", namespace, "-l", selector, "-o", "json"]
    if kubeconfig:
        cmd += ["--kubeconfig", kubeconfig]
    doc = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout)
    ips = [
        item["status"]["podIP"]
        for item in doc.get("items", [])
        if item.get("status", {}).get("phase") == "Running" and item["status"].get("podIP")
    ]
    if not ips:
        raise NoEndpoints(f"no running pod matches {selector!r} in namespace {namespace!r}")
    return host_endpoints(sorted(ips), port)


async def attach_lab(
    endpoints: str | Iterable[str],
    *,
    realm: str,
    ca: str | None = None,
    token: str | None = None,
    insecure: bool = False,
    timeout: float = 30.0,
    sample_interval: float | None = 1.0,
    **kw: Any,
) -> Lab:
    """``Lab.attach`` retried until every node answers or ``timeout`` passes (then the last error)."""
    from ..lab import Lab

    urls = as_list(endpoints)
    if not urls:
        raise NoEndpoints("no node endpoints given")
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        try:
            return await Lab.attach(
                urls,
                realm=realm,
                ca=ca,
                token=token,
                insecure=insecure,
                timeout=min(5.0, max(1.0, end - loop.time())),
                sample_interval=sample_interval,
                **kw,
            )
        except MaculaError as exc:
            if (
                "RealmMismatch" in str(exc)
                or "Certificate" in type(exc.__cause__).__name__
                or loop.time() >= end
            ):
                raise
            print(f"    waiting for the nodes: {exc}")
            await asyncio.sleep(1.0)
