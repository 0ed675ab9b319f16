#!/usr/bin/env python3
"""Container health check: GET the node's health endpoint; exit 0 when it answers 200.

    macula-healthcheck            # /ready (the image's HEALTHCHECK)
    macula-healthcheck /live      # any path of the health server

Reads the same ``MACULA_HEALTH_LISTEN`` as the node (default ``0.0.0.0:8080``;
a wildcard host is probed on loopback).  With the health server turned off
(``off`` or empty) there is nothing to probe: it says so and exits 0, so such a
container is not reported unhealthy forever.  Exit 1 otherwise, with the reason
on stdout (Docker keeps it in ``docker inspect``'s health log).
Standard library only: it runs in the slim image with no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_LISTEN = "0.0.0.0:8080"
TIMEOUT = 3.0  # below the HEALTHCHECK --timeout


def probe_url(listen: str, path: str = "/ready") -> str | None:
    """The URL to probe for a ``host:port`` health listen address; None when health is off."""
    listen = listen.strip()
    if listen.lower() in ("", "off"):
        return None
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{int(port)}{path}"


def main(argv: list[str]) -> int:
    path = argv[0] if argv else "/ready"
    try:
        url = probe_url(os.environ.get("MACULA_HEALTH_LISTEN", DEFAULT_LISTEN), path)
    except ValueError as exc:
        print(f"unhealthy: bad MACULA_HEALTH_LISTEN: {exc}")
        return 1
    if url is None:
        print("health server is off (MACULA_HEALTH_LISTEN): nothing to check")
        return 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
            print(f"{url}: {reply.status} {reply.read(200).decode(errors='replace').strip()}")
            return 0
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url}: {exc.code} {exc.read(200).decode(errors='replace').strip()}")
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
