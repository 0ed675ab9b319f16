"""``macula-lab``: the command line.

    macula-lab node ...        run a headless node (containers, pods, hosts)
    macula-lab certs ...       lab certificate authority and node certificates
    macula-lab ping URL ...    session handshake + PING against a running node
    macula-lab demo            a small local multi-node demo (separate processes)
    macula-lab procedure NAME  run a procedure notebook (papermill) and print its checklist
    macula-lab load ...        open-loop load test (a rate, or a saturation search) against a lab

This is a process entry point, so it owns its event loop (``asyncio.run``);
library code never does, so that it runs inside Jupyter kernels.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from . import __version__
from .core.params import DEFAULT_REALM
from .errors import MaculaError

log = logging.getLogger("macula_lab")


class ServeError(MaculaError):
    """A ``--serve`` service could not be advertised at startup (the node exits with 1)."""

    code = "serve_error"


def build_parser() -> argparse.ArgumentParser:
    """The ``macula-lab`` command line (``certs`` has a parser of its own)."""
    parser = argparse.ArgumentParser(
        prog="macula-lab", description="macula-lab: a lab kit for DHT service discovery over QUIC"
    )
    parser.add_argument("--version", action="version", version=f"macula-lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .deploy.config import add_node_arguments

    p_node = sub.add_parser(
        "node", help="run a headless node", description="Run a headless mesh node until SIGTERM/SIGINT."
    )
    add_node_arguments(p_node)
    sub.add_parser("certs", help="lab CA and node certificates (see `macula-lab certs -h`)", add_help=False)
    p_ping = sub.add_parser("ping", help="handshake with a node and PING it")
    p_ping.add_argument("endpoint", help="quic://host:port of the node")
    p_ping.add_argument(
        "--realm",
        default=os.environ.get("MACULA_REALM", DEFAULT_REALM),
        help=f"realm of the node (env MACULA_REALM; default {DEFAULT_REALM})",
    )
    p_ping.add_argument(
        "--ca", default=os.environ.get("MACULA_CA"), help="lab CA certificate (env MACULA_CA)"
    )
    p_ping.add_argument(
        "--cert",
        default=os.environ.get("MACULA_CERT"),
        help="client certificate of the lab CA: `macula-lab certs issue-client NAME` (env MACULA_CERT)",
    )
    p_ping.add_argument("--key", default=os.environ.get("MACULA_KEY"), help="its private key (env MACULA_KEY)")
    p_ping.add_argument(
        "--certs-dir",
        default=None,
        metavar="DIR",
        help="use DIR/ca.pem, DIR/lab.pem and DIR/lab.key for whichever of --ca/--cert/--key is not set",
    )
    p_ping.add_argument(
        "--insecure", action="store_true", help="do not verify the node's certificate (loudly logged)"
    )
    p_ping.add_argument("--count", type=int, default=3, help="PINGs to send (default 3)")
    p_ping.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for each PING, the first one's handshake included (default 5)"
    )
    p_demo = sub.add_parser("demo", help="start 3 local node processes and exercise them")
    p_demo.add_argument("--nodes", type=int, default=3, help="node processes to start (default 3)")
    p_demo.add_argument("--keep", action="store_true", help="leave the work directory in place")
    from .procedures.runner import add_procedure_parser

    add_procedure_parser(sub)
    from .lab.load_cli import add_load_parser

    add_load_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    from .lab.load_cli import load_main
    from .procedures.runner import procedure_main

    if argv and argv[0] == "certs":  # the certs tool has its own parser
        from .transport.certs import certs_cli

        return certs_cli(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "node":
        return _run_node(args)
    if args.command == "ping":
        _logging("WARNING")
        return asyncio.run(_ping(args))
    if args.command == "demo":
        _logging("WARNING")
        from .deploy.demo import run_demo

        return asyncio.run(run_demo(n=args.nodes, keep=args.keep))
    if args.command == "procedure":
        return procedure_main(args)
    if args.command == "load":
        return load_main(args)
    return 2


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_node(args: argparse.Namespace) -> int:
    from .deploy.config import ConfigError, config_from_args

    try:
        config = config_from_args(args).validate()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _logging(config.log_level)
    logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic's per-packet chatter
    if any(a == "--admin-token" or a.startswith("--admin-token=") for a in sys.argv[1:]):
        log.warning(
            "the admin token was given on the command line, where every local user can read it "
            "in the process list: prefer MACULA_ADMIN_TOKEN or --admin-token-file"
        )
    try:
        return asyncio.run(_serve(config))
    except MaculaError as exc:
        log.error("node failed: %s", exc)
        return 1


async def _serve(config) -> int:
    from .runtime.node import Node

    node = Node.from_config(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await node.start()  # joins through the bootstrap peers (retrying in the background)
    try:
        await _advertise_builtins(node, config.serve, config.service_ttl, 6 * config.request_timeout)
    except BaseException:
        await node.stop()
        raise
    log.info(
        "node %s ready: endpoint=%s health=%s contacts=%d services=%s",
        node.name,
        node.endpoint,
        node.health_port or "off",
        len(node.dht.table),
        ",".join(config.serve) or "-",
    )
    await stop.wait()
    log.info("node %s: signal received, shutting down", node.name)
    await node.stop()
    return 0


async def _advertise_builtins(node, serve: dict[str, str], ttl: float, timeout: float) -> None:
    """``--serve``: advertise each built-in handler (kinds were checked by the config)."""
    from .runtime.handlers import make_handler

    for name, kind in serve.items():
        try:
            async with asyncio.timeout(timeout):
                ad = await node.advertise(name, make_handler(kind, node.name), ttl=ttl)
        except TimeoutError:
            raise ServeError(f"advertising {name} took longer than {timeout:g}s") from None
        except MaculaError as exc:
            raise ServeError(f"advertising {name} failed: {type(exc).__name__}: {exc}") from None
        log.info(
            "node %s serving %s (%s handler) ttl=%gs replicas=%d", node.name, name, kind, ttl, ad.replicas
        )


async def _ping(args: argparse.Namespace) -> int:
    from .lab.client import client_tls
    from .runtime.node import Node

    try:
        tls = client_tls(ca=args.ca, cert=args.cert, key=args.key, certs=args.certs_dir, insecure=args.insecure)
    except MaculaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.insecure and not (tls.ca and tls.cert):
        print(
            "error: give the lab CA and a client certificate (--ca, --cert, --key, or --certs-dir), or --insecure",
            file=sys.stderr,
        )
        return 2
    node = Node(name="macula-ping", realm=args.realm, listen=None, tls=tls)
    await node.start()
    try:
        for i in range(args.count):
            rtt = await node.ping(args.endpoint, timeout=args.timeout)
            peer = node.transport.session(args.endpoint)
            who = f"{peer.name} ({peer.short_id})" if peer else "?"
            print(f"PONG from {who} at {args.endpoint}: seq={i + 1} time={rtt * 1000:.2f} ms")
    except MaculaError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        await node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
