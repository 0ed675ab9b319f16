"""``macula-lab demo``: a small local multi-node run, end to end.

Starts N ``macula-lab node`` processes on loopback (real QUIC, TLS verified
against a fresh lab CA), bootstraps them to the first one, then from this
process: session handshake + PING to every node, a procedure call on every
node, the health endpoints, and a graceful SIGTERM shutdown.  Prints each step
and exits non-zero if any step failed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from .certs import lab_certs
from .node import Node
from .procs import NodeProcess, start_node_process
from .transport.quic import TlsConfig

REALM = "com.test.demo"


def _say(ok: bool, text: str) -> bool:
    print(f"  [{'ok' if ok else 'FAIL'}] {text}", flush=True)
    return ok


async def run_demo(n: int = 3, keep: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="macula-demo-"))
    names = [f"node-{i}" for i in range(1, n + 1)]
    results: list[bool] = []
    procs: list[NodeProcess] = []
    t0 = time.perf_counter()
    print(f"=== macula-lab demo: {n} nodes, realm {REALM} ===")
    print(f"work directory: {work}")
    lab_certs(work / "certs", names + ["observer"])
    print(f"lab CA and {n} node certificates in {work / 'certs'}")
    observer = Node(
        name="observer", realm=REALM, listen=None, tls=TlsConfig(ca=str(work / "certs" / "ca.pem"))
    )
    try:
        print("starting nodes...")
        for name in names:
            args = [
                "--listen",
                "quic://127.0.0.1:0",
                "--realm",
                REALM,
                "--certs-dir",
                str(work / "certs"),
                "--health-listen",
                "127.0.0.1:0",
            ]
            if procs:
                args += ["--bootstrap", procs[0].endpoint]
            proc = await start_node_process(name, args)
            procs.append(proc)
            print(
                f"  {name}: pid {proc.pid}, {proc.endpoint}, health http://127.0.0.1:{proc.health_port}/health"
            )
        await observer.start()

        print("session handshake + PING (certificates verified against the lab CA):")
        for p in procs:
            rtt = await observer.ping(p.endpoint)
            peer = observer.transport.session(p.endpoint)
            results.append(
                _say(
                    peer is not None and peer.name == p.name,
                    f"{p.name} answered as {peer.name if peer else '?'} in {rtt * 1000:.2f} ms",
                )
            )

        print("procedure calls:")
        args = {"operation": "add", "a": 10, "b": 5}
        for p in procs:
            echoed = await observer.call_procedure(p.endpoint, "macula.echo", args)
            info = await observer.call_procedure(p.endpoint, "macula.info")
            results.append(
                _say(
                    echoed == args and info["name"] == p.name,
                    f"{p.name}: macula.echo -> {echoed}, uptime {info['uptime_s']:.2f}s",
                )
            )

        print("bootstrap (nodes reached the first node):")
        for p in procs[1:]:
            results.append(
                _say(
                    p.contacts >= 1 and any(" joined: " in line for line in p.lines),
                    f"{p.name} joined the DHT with {p.contacts} contact(s) after its self-lookup",
                )
            )

        print("health endpoints:")
        for p in procs:
            doc = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{p.health_port}/health")
            metrics = await asyncio.to_thread(_get_text, f"http://127.0.0.1:{p.health_port}/metrics")
            results.append(
                _say(
                    doc.get("ready") is True and "macula_requests_served_total" in metrics,
                    f"{p.name}: /health ready={doc.get('ready')}, /metrics ok",
                )
            )
    except Exception as exc:  # report, then clean up
        results.append(_say(False, f"{type(exc).__name__}: {exc}"))
    finally:
        await observer.stop()
        print("graceful shutdown (SIGTERM):")
        for p in procs:
            code = await p.stop()
            results.append(_say(code == 0, f"{p.name} exited with {code}"))
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    passed = sum(results)
    print(f"=== {passed}/{len(results)} checks passed in {time.perf_counter() - t0:.1f}s ===")
    return 0 if results and all(results) else 1


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()
