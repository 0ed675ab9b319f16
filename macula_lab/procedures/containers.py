"""Which containers serve a procedure's endpoints: names, images and image ids, for the report.

    containers_behind(["quic://172.20.0.11:9443", "quic://localhost:9444"])
    # {"runtime": "podman", "containers": [{"endpoint": ..., "name": "macula_node1", "id": ...,
    #   "image": "localhost/macula-lab:latest", "image_id": "4f445e8bce0f..."}, ...]}

Asks the container engine this machine's CLI reaches (``podman``, then
``docker``; ``ps`` and ``inspect``, nothing else) which running container has
an endpoint's host as its address on a container network, its host name,
its name or its compose service name, or (for ``localhost``/``127.0.0.1``)
publishes the endpoint's port as UDP.  Returns ``{}`` when no CLI answers or no
container matches (nodes on hosts, in network namespaces, inside a container
without the engine's socket), so a report says "containers" only when it
really ran against them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any
from urllib.parse import urlsplit

RUNTIMES = ("podman", "docker")
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def containers_behind(endpoints: list[str], runtimes: tuple[str, ...] = RUNTIMES) -> dict[str, Any]:
    """The running containers behind ``endpoints`` (see the module docstring); ``{}`` if none."""
    for cli in runtimes:
        found = _inspect_all(cli)
        if not found:
            continue
        rows = []
        for url in endpoints:
            parts = urlsplit(url if "://" in url else f"quic://{url}")
            c = next((c for c in found if _serves(c, parts.hostname or "", parts.port or 9443)), None)
            if c is not None:
                rows.append(
                    {
                        "endpoint": url,
                        "name": c["Name"].lstrip("/"),
                        "id": c["Id"][:12],
                        # podman: ImageName + Image (the id); docker: Config.Image + Image ("sha256:...")
                        "image": c.get("ImageName") or (c.get("Config") or {}).get("Image", ""),
                        "image_id": str(c.get("Image", "")).removeprefix("sha256:"),
                    }
                )
        if rows:
            return {"runtime": cli, "containers": rows}
    return {}


def describe(deployment: dict[str, Any]) -> str:
    """One line for a report: ``podman containers macula_node1, ... (image localhost/macula-lab:latest 4f445e8bce0f)``."""
    rows = deployment.get("containers") or []
    if not rows:
        return ""
    images = dict.fromkeys(f"{r['image']} {r['image_id'][:12]}".strip() for r in rows)
    return (
        f"{deployment.get('runtime', 'container')} containers {', '.join(r['name'] for r in rows)} "
        f"(image {', '.join(images)})"
    )


def _inspect_all(cli: str) -> list[dict[str, Any]]:
    if shutil.which(cli) is None:
        return []
    try:
        ids = subprocess.run([cli, "ps", "-q"], capture_output=True, text=True, timeout=10)
        if ids.returncode != 0 or not ids.stdout.split():
            return []
        done = subprocess.run(
            [cli, "inspect", *ids.stdout.split()], capture_output=True, text=True, timeout=10
        )
        return json.loads(done.stdout) if done.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def _serves(c: dict[str, Any], host: str, port: int) -> bool:
    settings = c.get("NetworkSettings") or {}
    config = c.get("Config") or {}
    if host in LOOPBACK:
        published = (settings.get("Ports") or {}).items()
        return any(
            key.endswith("/udp") and any(str(b.get("HostPort")) == str(port) for b in bindings or [])
            for key, bindings in published
        )
    names = {c.get("Name", "").lstrip("/"), config.get("Hostname", "")}
    names.add((config.get("Labels") or {}).get("com.docker.compose.service", ""))
    for net in (settings.get("Networks") or {}).values():
        names.add(net.get("IPAddress", ""))
        names.update(net.get("Aliases") or [])
    names.add(settings.get("IPAddress", ""))
    return host in names - {""}
