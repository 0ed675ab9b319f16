"""RPC Execution: the call reaches a provider, its handler runs, the reply returns; errors have names."""

from __future__ import annotations

import json

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
    reached = [i for i in ctx.invocations[n0:] if i.provider == res.provider]
    checks = [
        Check(
            GROUP,
            "Call reaches provider",
            bool(reached),
            res.provider,
            "",
            f"[{res.provider} handler] received call with args: {json.dumps(reached[0].args)}"
            if reached
            else f"no handler invocation recorded on {res.provider}",
        )
    ]
    from ..runtime.handlers import make_handler

    expected = make_handler("calculator", res.provider)(cfg.args)
    checks.append(
        Check(
            GROUP,
            "Handler executes successfully",
            res.value == expected,
            json.dumps(res.value),
            "",
            f"expected {json.dumps(expected)}",
        )
    )
    checks.append(
        Check(
            GROUP,
            "Response returned to caller",
            res.value is not None,
            round(res.latency * 1000, 2),
            "ms",
            f"{ctx.consumer} SUCCESS! received {json.dumps(res.value)} from {res.provider}",
        )
    )
    checks.append(await _error_handling(ctx))
    return checks


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
