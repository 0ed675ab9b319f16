"""``macula-lab demo``: the testing guide's local multi-node scenario, end to end, in real processes.

Starts three ``macula-lab node`` processes on loopback (real QUIC, TLS verified
against a fresh lab CA); node-2 and node-3 join the DHT through node-1.  This
process then attaches to them as clients, the way a notebook attaches to pods:

1. through node-1: advertise ``test.calculator`` (the handler runs here);
2. through node-2: call it with ``{"operation": "add", "a": 10, "b": 5}``;
3. through node-3: advertise the same service (a second provider);
4. through node-2: discover, expecting 2 providers; then unadvertise one;
5. health endpoints, and a graceful SIGTERM shutdown of every node.

Each step prints what really happened and the run exits non-zero if any check
failed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from ..lab.client import Client, connect
from ..transport.certs import issue_client_cert, lab_certs
from .procs import NodeProcess, start_node_process

REALM = "com.test.multinode"
SERVICE = "test.calculator"


def _say(ok: bool, text: str) -> bool:
    print(f"  [{'ok' if ok else 'FAIL'}] {text}", flush=True)
    return ok


def _handler(node_label: str):
    def calculator(args: dict) -> dict:
        print(f"  [{node_label} handler] received call with args: {args}", flush=True)
        if args.get("operation") != "add":
            raise ValueError(f"unsupported operation {args.get('operation')!r}")
        return {"result": args["a"] + args["b"], "node": node_label}

    return calculator


def _events(proc: NodeProcess, kind: str) -> list[str]:
    return [line.split("] ", 1)[-1] for line in proc.lines if f"] {kind} {SERVICE}" in line]


async def run_demo(n: int = 3, keep: bool = False) -> int:
    n = max(3, n)
    work = Path(tempfile.mkdtemp(prefix="macula-demo-"))
    certs = work / "certs"
    names = [f"node-{i}" for i in range(1, n + 1)]
    results: list[bool] = []
    procs: list[NodeProcess] = []
    clients: list[Client] = []
    t0 = time.perf_counter()
    print(f"=== macula-lab demo: multi-node DHT service discovery ({n} nodes, realm {REALM}) ===")
    lab_certs(certs, names, ips=["127.0.0.1"])  # the nodes listen (and are dialled) on loopback
    for client in ("provider-1", "consumer", "provider-3"):  # the three attached clients' identities
        issue_client_cert(certs, client)
    print(f"lab CA, node and client certificates in {certs}")
    try:
        for name in names:
            args = [
                "--listen",
                "quic://127.0.0.1:0",
                "--realm",
                REALM,
                "--certs-dir",
                str(certs),
                "--health-listen",
                "127.0.0.1:0",
            ]
            if procs:
                args += ["--bootstrap", procs[0].endpoint]
            proc = await start_node_process(name, args)
            procs.append(proc)
            print(f"started {name}: pid {proc.pid}, {proc.endpoint}, {proc.contacts} DHT contact(s)")
        for p in procs[1:]:
            results.append(_say(p.contacts >= 1, f"{p.name} joined the DHT through {procs[0].name}"))

        def creds(name: str) -> dict[str, str]:
            return {"ca": str(certs / "ca.pem"), "cert": str(certs / f"{name}.pem"), "key": str(certs / f"{name}.key")}

        provider1 = await connect(procs[0].endpoint, realm=REALM, name="provider-1", **creds("provider-1"))
        consumer = await connect(procs[1].endpoint, realm=REALM, name="consumer", **creds("consumer"))
        provider3 = await connect(procs[2].endpoint, realm=REALM, name="provider-3", **creds("provider-3"))
        clients += [provider1, consumer, provider3]
        print("attached clients to node-1 (provider), node-2 (consumer), node-3 (second provider)")

        print(f"--- node-1 advertises {SERVICE} (TTL 60 s) ---")
        replicas = await provider1.advertise(
            SERVICE, _handler("node-1"), ttl=60, metadata={"version": "1.0", "node": "node-1"}
        )
        results.append(_say(replicas >= 1, f"published {SERVICE} to the DHT: stored on {replicas} node(s)"))
        await asyncio.sleep(0.2)  # let node-1's log line arrive
        scheduled = _events(procs[0], "readvertise_scheduled")
        results.append(
            _say(
                bool(scheduled),
                f"node-1 log: {scheduled[-1] if scheduled else 'no re-advertisement scheduled'}",
            )
        )

        print(f"--- node-2 calls {SERVICE} (discovering via the DHT) ---")
        args = {"operation": "add", "a": 10, "b": 5}
        res = await consumer.call(SERVICE, args, details=True)
        ok = res.value == {"result": 15, "node": "node-1"}
        results.append(
            _say(
                ok,
                f"node-2 SUCCESS! received {json.dumps(res.value)} from {res.provider} in {res.latency * 1000:.1f} ms",
            )
        )

        print(f"--- node-3 advertises {SERVICE} too ---")
        replicas = await provider3.advertise(
            SERVICE, _handler("node-3"), ttl=60, metadata={"version": "1.0", "node": "node-3"}
        )
        results.append(_say(replicas >= 1, f"published {SERVICE} from node-3: stored on {replicas} node(s)"))
        providers = await consumer.discover(SERVICE, refresh=True)
        found = sorted(p.metadata.get("node", "?") for p in providers)
        results.append(
            _say(
                found == ["node-1", "node-3"],
                f"found {len(providers)} providers for {SERVICE} in the DHT: {found}",
            )
        )

        print("--- calls spread over both providers (round_robin) ---")
        served = [await consumer.call(SERVICE, args, strategy="round_robin") for _ in range(4)]
        spread = sorted({s["node"] for s in served})
        results.append(
            _say(spread == ["node-1", "node-3"], f"4 calls served by {[s['node'] for s in served]}")
        )

        print("--- node-3 unadvertises ---")
        removed = await provider3.unadvertise(SERVICE)
        left = await consumer.discover(SERVICE, refresh=True)
        results.append(
            _say(
                removed >= 1 and [p.metadata.get("node") for p in left] == ["node-1"],
                f"removed from {removed} node(s); providers left: {[p.metadata.get('node') for p in left]}",
            )
        )

        print("--- health endpoints ---")
        for p in procs:
            doc = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{p.health_port}/health")
            metrics = await asyncio.to_thread(_get_text, f"http://127.0.0.1:{p.health_port}/metrics")
            results.append(
                _say(
                    doc.get("ready") is True and "macula_dht_contacts" in metrics,
                    f"{p.name}: /health ready={doc.get('ready')}, /metrics served",
                )
            )
    except Exception as exc:  # report, then clean up
        results.append(_say(False, f"{type(exc).__name__}: {exc}"))
    finally:
        for client in clients:
            await client.close()
        print("--- graceful shutdown (SIGTERM) ---")
        for p in procs:
            code = await p.stop()
            results.append(_say(code == 0, f"{p.name} exited with {code}"))
        if keep:
            print(f"node logs kept in memory only; work directory kept: {work}")
        else:
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
