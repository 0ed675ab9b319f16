"""The whole "What to verify" checklist against a lab, as one call returning a :class:`Report`.

    report = await run_checklist(lab, ttl=3.0)          # local or attached lab
    report                                              # the table
    assert_passed(report, lab)                          # raises ProcedureFailed

Steps, in order (each one's checks are filed under the testing guide's groups):
advertise from every provider, discovery, RPC execution, re-advertisement
(waits ``readvertise_cycles`` x 0.8 x TTL), cleanup.  A step that raises does
not stop the run: its checks are recorded as failed with the error, and
cleanup still runs so nothing is left advertised.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .advertisement import GROUP as ADVERTISEMENT
from .advertisement import advertise_all
from .cleanup import GROUP as CLEANUP
from .cleanup import cleanup, take_baseline
from .context import ChecklistConfig, Context
from .discovery import GROUP as DISCOVERY
from .discovery import discovery
from .faults import inject
from .progress import Progress
from .readvertisement import GROUP as READVERTISEMENT
from .readvertisement import readvertisement
from .report import Check, Report
from .rpc import GROUP as RPC
from .rpc import rpc

if TYPE_CHECKING:
    from ..lab.lab import Lab

#: the testing guide's boxes, per step (used to mark a step's checks failed when it raised)
BOXES = {
    "advertise": [
        (ADVERTISEMENT, "Service published to DHT successfully"),
        (ADVERTISEMENT, "Re-advertisement timer scheduled"),
        (ADVERTISEMENT, "Multiple providers can advertise same service"),
    ],
    "discovery": [
        (DISCOVERY, "Consumer finds provider via DHT query"),
        (DISCOVERY, "Discovery result cached (60s TTL)"),
        (DISCOVERY, "Cache hit on subsequent calls"),
        (DISCOVERY, "Multiple providers returned from DHT"),
    ],
    "rpc": [
        (RPC, "Call reaches provider"),
        (RPC, "Handler executes successfully"),
        (RPC, "Response returned to caller"),
        (RPC, "Error handling works"),
    ],
    "readvertisement": [
        (READVERTISEMENT, "Timer fires at correct interval"),
        (READVERTISEMENT, "Service re-published to DHT"),
        (READVERTISEMENT, "Next timer scheduled"),
        (READVERTISEMENT, "Continues indefinitely until unadvertise"),
        (ADVERTISEMENT, "Re-advertisement happens before TTL expiry"),
    ],
    "cleanup": [
        (CLEANUP, "Unadvertise removes from DHT"),
        (CLEANUP, "Timer cancelled on unadvertise"),
        (CLEANUP, "No orphaned processes or timers"),
    ],
}
STEPS = {
    "advertise": ("Service Advertisement", advertise_all),
    "discovery": ("Service Discovery", discovery),
    "rpc": ("RPC Execution", rpc),
    "readvertisement": ("Re-advertisement (waits for the timers)", readvertisement),
    "cleanup": ("Cleanup", cleanup),
}


async def run_checklist(
    lab: Lab,
    config: ChecklistConfig | None = None,
    *,
    name: str = "checklist",
    faults: dict[str, str] | None = None,
    progress: bool | Progress = True,
    diagnose_failures: bool = True,
    **options: Any,
) -> Report:
    """Run every step against ``lab``; ``options`` are :class:`ChecklistConfig` fields.

    ``faults`` (``{"node-3": "no_readvertise"}``) are injected after the
    advertisements (see :mod:`.faults`): the report must then fail.  When a
    check failed, :func:`~.diagnose.diagnose` runs before the cleanup (while
    the service is still advertised) and its verdict goes into the report.
    """
    config = config or ChecklistConfig(**options)
    total = len(STEPS) + (1 if config.served_service else 0)
    prog = progress if isinstance(progress, Progress) else Progress(total, title=name, enabled=bool(progress))
    ctx = Context(lab, config, prog)
    params = {k: v for k, v in asdict(config).items()}
    params.update(providers=ctx.providers, consumer=ctx.consumer, nodes=lab.names, mode=lab.mode)
    if faults:
        params["faults"] = dict(faults)
    report = Report(name, parameters=params)
    prog.note(
        f"providers {ctx.providers}, consumer {ctx.consumer}, service {config.service}, ttl {config.ttl:g}s"
    )
    await take_baseline(ctx)
    for key, (title, step) in STEPS.items():
        if key == "cleanup" and report.failed and diagnose_failures:
            await _diagnose(ctx, report)
        prog.step(title)
        t0 = time.perf_counter()
        try:
            checks = await step(ctx)
        except Exception as exc:  # a broken step is a failed step, and cleanup still runs
            why = f"step raised {type(exc).__name__}: {exc}"
            checks = [Check(group, title, None, evidence=why) for group, title in BOXES[key]]
            if key == "cleanup":
                await _force_cleanup(ctx, report)
        report.extend(checks)
        failed = [c.title for c in checks if not c.passed]
        prog.note(
            f"{len(checks) - len(failed)}/{len(checks)} passed in {time.perf_counter() - t0:.1f}s"
            + (f"; failed: {failed}" if failed else "")
        )
        if key == "advertise" and not ctx.advertised:  # nothing to discover, call or watch
            rest = [box for k in list(STEPS)[1:] for box in BOXES[k]]
            report.extend(Check(g, t, None, evidence="not run: no provider advertised") for g, t in rest)
            break
        if key == "advertise" and faults:
            report.notes += inject(lab, faults, config.service)
    if config.served_service:
        prog.step(f"Deployment: {config.served_service} served by the nodes")
        report.add(await served(ctx))
    prog.finish()
    return report.finish(lab)


async def served(ctx: Context) -> Check:
    """The nodes' own services (``--serve``): discoverable and callable from the consumer."""
    cfg = ctx.config
    service = cfg.served_service
    try:
        names = await ctx.provider_names(refresh=True, service=service)
        res = await ctx.node(ctx.consumer).call(service, cfg.served_args, timeout=cfg.call_timeout)
    except Exception as exc:
        return Check(
            "Deployment", f"{service} served by the nodes", False, evidence=f"{type(exc).__name__}: {exc}"
        )
    from ..runtime.handlers import make_handler

    expected = make_handler("calculator", res.provider)(cfg.served_args)
    return Check(
        "Deployment",
        f"{service} served by the nodes",
        bool(names) and res.value == expected,
        len(names),
        "provider(s)",
        f"providers {names}; {ctx.consumer} called {service}({cfg.served_args}) -> {res.value} from {res.provider}",
    )


async def _diagnose(ctx: Context, report: Report) -> None:
    from .diagnose import diagnose

    try:
        found = await diagnose(ctx.lab, ctx.config.service, consumer=ctx.consumer)
    except Exception as exc:  # the diagnosis helps; it must not hide the checklist's result
        report.notes.append(f"diagnosis failed: {type(exc).__name__}: {exc}")
        return
    report.diagnosis = found.to_dict()
    ctx.progress.note(found.text().replace("\n", "\n    "))


async def _force_cleanup(ctx: Context, report: Report) -> None:
    for p in list(ctx.advertised):
        try:
            await ctx.node(p).unadvertise(ctx.config.service)
        except Exception as exc:
            report.notes.append(f"could not unadvertise {ctx.config.service} from {p}: {exc}")
