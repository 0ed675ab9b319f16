"""Start ``macula-lab node`` processes and wait until they are ready.

Used by the demo and the tests: the node prints a ``ready: endpoint=...`` log
line once it listens; we read its stderr until that line (bounded in time), then
keep draining the output in the background so the pipe never fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import MaculaError

_READY = re.compile(r"node (\S+) ready: endpoint=(\S+) health=(\S+) contacts=(\d+)")


class NodeProcessError(MaculaError):
    code = "node_process_error"


@dataclass
class NodeProcess:
    name: str
    proc: asyncio.subprocess.Process
    endpoint: str = ""
    health_port: int | None = None
    contacts: int = 0  # routing-table size when the node reported ready
    lines: list[str] = field(default_factory=list)
    _drain: asyncio.Task | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the node and wait for it to exit; SIGKILL after ``timeout``."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._drain, 2)
        return self.proc.returncode

    def log_text(self) -> str:
        return "\n".join(self.lines)


async def start_node_process(
    name: str,
    args: Sequence[str] = (),
    *,
    env: dict[str, str] | None = None,
    timeout: float = 20.0,
) -> NodeProcess:
    """Run ``python -m macula_lab node --name NAME ARGS...`` and wait for readiness."""
    cmd = [sys.executable, "-m", "macula_lab", "node", "--name", name, *args]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    return await wait_ready(NodeProcess(name, proc), timeout)


async def wait_ready(np: NodeProcess, timeout: float = 20.0) -> NodeProcess:
    """Read a started node's output (stdout with stderr merged) until its ready line.

    Fills ``endpoint``, ``health_port`` and ``contacts``, then keeps draining the
    output in the background.  The process is killed if it is not ready in time.
    """
    proc, name = np.proc, np.name
    try:
        async with asyncio.timeout(timeout):
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    await proc.wait()
                    raise NodeProcessError(
                        f"node {name} exited with {proc.returncode} before it was ready:\n" + np.log_text()
                    )
                line = raw.decode(errors="replace").rstrip()
                np.lines.append(line)
                m = _READY.search(line)
                if m:
                    np.endpoint = m.group(2)
                    np.health_port = None if m.group(3) == "off" else int(m.group(3))
                    np.contacts = int(m.group(4))
                    break
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise NodeProcessError(f"node {name} not ready within {timeout:g}s:\n" + np.log_text()) from None
    np._drain = asyncio.get_running_loop().create_task(_drain(np))
    return np


async def _drain(np: NodeProcess) -> None:
    while True:
        raw = await np.proc.stdout.readline()
        if not raw:
            return
        np.lines.append(raw.decode(errors="replace").rstrip())
