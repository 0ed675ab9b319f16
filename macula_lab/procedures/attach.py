"""Endpoints of nodes running elsewhere, from what a deployment option knows about them.

- containers (Docker Compose): service names -> ``quic://node-1:9443`` (the
  compose network's DNS; from the host use the published addresses instead);
- Kubernetes (k3s): pods found by label through the Kubernetes API
  (:mod:`macula_lab.deploy.k8s`), or pod addresses given;
- bare hosts: ``beam00.lab``, ``beam00.lab:9443`` or full URLs.

:func:`attach_lab` attaches with retries, so a notebook started together with
its nodes waits for them (bounded by ``timeout``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..errors import CertificateError, InvalidField, MaculaError, RealmMismatch, Unauthenticated

if TYPE_CHECKING:
    from ..lab.lab import Lab

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


async def k8s_endpoints(
    namespace: str | None = None,
    selector: str | None = None,
    port: int = DEFAULT_PORT,
    *,
    pods: str | Iterable[str] | None = None,
    kubeconfig: str | None = None,
) -> list[str]:
    """Pods given (names or addresses), else the ready pods matching ``selector`` (:mod:`macula_lab.deploy.k8s`).

    ``namespace``/``selector`` default to the StatefulSet's (``macula-test``, its labels).
    """
    given = as_list(pods)
    if given:
        return host_endpoints(given, port)
    from ..deploy.k8s import find_node_endpoints

    return await find_node_endpoints(namespace=namespace, selector=selector, kubeconfig=kubeconfig)


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
    from ..lab.lab import Lab

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
            # a wrong realm, a refused or missing certificate, a missing file: waiting will not help
            if isinstance(exc.__cause__, (RealmMismatch, CertificateError, InvalidField)):
                if isinstance(exc.__cause__, Unauthenticated):
                    raise type(exc)(
                        f"{exc}; give the lab a client certificate of the nodes' CA: cert=/key=, or lab.pem "
                        f"and lab.key beside ca.pem ({ca or 'no ca given'})"
                    ) from exc.__cause__
                raise
            if "RealmMismatch" in str(exc) or loop.time() >= end:
                raise
            print(f"    waiting for the nodes: {exc}")
            await asyncio.sleep(1.0)
