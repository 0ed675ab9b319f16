"""RPC Execution: the call reaches a provider, its handler runs, the reply returns; errors have names."""

from __future__ import annotations

import json
from typing import Any

from ..runtime.services import RemoteError, ServiceNotFound
from .context import Context
from .report import Check

GROUP = "RPC Execution"


async def rpc(ctx: Context) -> list[Check]:
    cfg = ctx.config
    consumer = ctx.node(ctx.consumer)
    n0 = len(ctx.invocations)
    try:
        res = await consumer.call(cfg.service, cfg.args, timeout=cfg.call_timeout)
    except Exception as exc:
        why = f"{ctx.consumer} -> {cfg.service}: {type(exc).__name__}: {exc}"
        checks = [
            Check(GROUP, t, False, evidence=why)
            for t in ("Call reaches provider", "Handler executes successfully", "Response returned to caller")
        ]
        return checks + [await _error_handling(ctx)]
    ran = ctx.invocations[n0:]
    reached = [i for i in ran if i.provider == res.provider]
    checks = [
        Check(
            GROUP,
            "Call reaches provider",
            bool(reached),
            res.provider,
            "",
            f"[{res.provider} handler] received call with args: {json.dumps(reached[0].args)}"
            if reached
            else f"no handler invocation recorded on {res.provider}"
            + (f" (the handler ran on {sorted({i.provider for i in ran})})" if ran else ""),
        )
    ]
    # judged on what the handler itself returned, against arithmetic done here
    # (not the calculator's own code, which a fault in the handler would share)
    inv = (reached or ran or [None])[-1]
    expected = None if inv is None else expected_answer(cfg.args, inv.provider)
    ok = inv is not None and inv.error is None and inv.result == expected
    checks.append(
        Check(
            GROUP,
            "Handler executes successfully",
            ok,
            None if inv is None else json.dumps(inv.result if inv.error is None else repr(inv.error)),
            "",
            "the handler never ran"
            if inv is None
            else f"[{inv.provider} handler] returned "
            + (json.dumps(inv.result) if inv.error is None else f"raised {inv.error!r}")
            + f", expected {json.dumps(expected)}",
        )
    )
    # the caller must receive exactly what the handler returned
    ok = inv is not None and inv.error is None and res.value == inv.result
    checks.append(
        Check(
            GROUP,
            "Response returned to caller",
            ok,
            round(res.latency * 1000, 2),
            "ms",
            f"{ctx.consumer} received {json.dumps(res.value)} from {res.provider}"
            + (
                ""
                if inv is None or res.value == inv.result
                else f", but the handler returned {json.dumps(inv.result)}"
            ),
        )
    )
    checks.append(await _error_handling(ctx))
    return checks


def expected_answer(args: dict[str, Any], provider: str) -> dict[str, Any] | None:
    """The calculator's answer to ``args`` on ``provider``, or None for arguments it refuses."""
    if not isinstance(args, dict):
        return None
    op = args.get("operation", "add")
    a, b = args.get("a"), args.get("b")
    answers = {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "div": lambda: a / b}
    try:
        return {"result": answers[op](), "node": provider}
    except (KeyError, TypeError, ZeroDivisionError):
        return None


async def _error_handling(ctx: Context) -> Check:
    """A handler that raises gives the caller RemoteError (type and message); a missing service ServiceNotFound."""
    cfg = ctx.config
    consumer = ctx.node(ctx.consumer)
    failing = f"{cfg.service}.failing"
    provider = ctx.providers[0]
    seen: list[str] = []
    ok = True
    await ctx.node(provider).advertise(failing, "fail", ttl=cfg.ttl)
    try:
        for service, wanted in ((failing, RemoteError), (f"{cfg.service}.missing", ServiceNotFound)):
            try:
                value = await consumer.call(service, {}, timeout=cfg.call_timeout)
            except wanted as exc:
                kind = getattr(exc, "remote_type", "")
                seen.append(f"{service}: {type(exc).__name__}{f' ({kind})' if kind else ''}: {exc}")
            except Exception as exc:
                ok = False
                seen.append(f"{service}: expected {wanted.__name__}, got {type(exc).__name__}: {exc}")
            else:
                ok = False
                seen.append(f"{service}: expected {wanted.__name__}, got a value {value!r}")
    finally:
        await ctx.node(provider).unadvertise(failing)
    return Check(
        GROUP, "Error handling works", ok, "RemoteError, ServiceNotFound" if ok else None, "", "; ".join(seen)
    )
