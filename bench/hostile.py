"""Hostile-peer benchmark: legitimate calls through a node while one process floods it.

Run ``python bench/hostile.py --help``.  Everything runs on loopback, in one
process tree.  For every attack (``--only`` picks some) the bench starts a fresh
mesh of three ``macula-lab node`` processes (a lab CA from
:func:`~macula_lab.transport.certs.lab_certs`, TLS 1.3, certificates verified);
the victim ``node-1`` serves ``math.add`` (``--serve math.add=calculator``),
``node-2`` and ``node-3`` join through it.  A legitimate caller in the bench
process, an attached client of the victim (``macula_lab.connect``), calls
``math.add`` through it at a steady open-loop rate and refreshes its discovery
of the service every second.  Then, on the same mesh:

1. **quiet**: ``--duration`` seconds of legitimate load alone;
2. **flood**: the same load for the same time while ONE separate flooder
   process (``bench/_flooder.py``) attacks the victim: ``halfopen`` (QUIC
   Initials never completed), ``idle`` / ``idle-nocert`` (connections that
   complete TLS with / without a lab client certificate, then send nothing or
   one CONNECT), ``store`` (STORE frames with forged provider entries, under
   the victim's own service key and under thousands of random keys, sent as a
   dozen claimed node identities),
   ``badframe`` (malformed, truncated, oversized frames), ``partial`` (frames
   announced at the size limit and never finished), or ``all`` of them at once;
3. **after**: the flooder closes its connections and exits; ``--settle``
   seconds later the victim's memory is read once more.

Per phase: legitimate calls sent, success, p50/p99 latency measured from each
call's *intended* send time (open loop: a stalled victim or caller cannot hide
latency by sending less; a failed call counts as infinitely slow), the victim's
RSS (``/proc/<pid>/status`` VmRSS, sampled every 100 ms) before / at its peak /
after, the victim's CPU seconds (``/proc/<pid>/stat``) and the bytes of log it
wrote.  At the end of each phase the bench also reads the victim's
``/metrics`` and advertises a probe service through it, to see whether a
genuine provider is still stored (after a flood, the incoming connections are
read once more ``--settle`` seconds after the flooder left).

Targets, per attack: **100 %** legitimate success during the flood and flood
p50 **<= 2x** the quiet p50 of the same mesh; the victim's RSS growth is
reported for information.

Exit status: 0 whether targets are met or not (a benchmark, not a test); 1 if
the harness itself crashed (a traceback on stderr, the row reads CRASHED); 130
if interrupted.  Child processes and temporary files are removed on every exit (Ctrl-C and SIGTERM
included; after a SIGKILL of the bench the children still get SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The harness shared by the benchmarks lives next to this file (_common.py).  Put this
# folder on sys.path so that `import _common` works however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # also makes macula_lab importable from a checkout that is not installed
from _common import log

import macula_lab
from macula_lab.core.ids import service_key
from macula_lab.transport.certs import NodeCert, lab_certs

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
FLOODER = BENCH_DIR / "_flooder.py"
REALM = "bench.hostile"
SERVICE = "math.add"
VICTIM, OTHERS = "node-1", ("node-2", "node-3")
CALLER, FLOODER_CERT = "caller", "flooder"
ATTACKS = ("halfopen", "idle", "idle-nocert", "store", "badframe", "partial", "all")
TARGET_SUCCESS = 1.0
TARGET_P50_RATIO = 2.0
SAMPLE_EVERY = 0.1  # seconds between RSS samples of the victim
MIB = 1024 * 1024
_READY = re.compile(r"node (\S+) ready: endpoint=(\S+) health=(\S+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")

#: every child process started (pid), so that an interrupted run still kills them
_CHILDREN: set[int] = set()


# ================================================================== processes
def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if the bench dies without cleaning up (e.g. SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _spawn(*cmd: str, **kw: Any) -> asyncio.subprocess.Process:
    """A child in its own session (a Ctrl-C reaches the bench only; the bench stops it)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, preexec_fn=_die_with_parent, start_new_session=True, **kw
    )
    _CHILDREN.add(proc.pid)
    return proc


async def _reap(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; waits for the exit."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    _CHILDREN.discard(proc.pid)


def _kill_leftovers() -> None:
    """Last resort at exit: SIGKILL every child (and its process group) still registered."""
    for pid in list(_CHILDREN):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        _CHILDREN.discard(pid)


def _child_env() -> dict[str, str]:
    """The environment of the nodes: no MACULA_* settings of the caller's shell; macula_lab importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACULA_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@dataclass
class NodeProc:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    endpoint: str = ""
    health_port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        """VmRSS of the process (0 once it is gone)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            return math.nan

    def log_bytes(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _ready_line(log_path: Path) -> re.Match | None:
    return _READY.search(log_path.read_text(errors="replace"))


async def start_node(name: str, args: list[str], log_path: Path, timeout: float = 60.0) -> NodeProc:
    """``python -m macula_lab node --name NAME ARGS``, output to ``log_path``; waits for its ready line."""
    out = log_path.open("wb")  # noqa: ASYNC230 (a local file, opened once)
    try:
        proc = await _spawn(
            sys.executable,
            "-m",
            "macula_lab",
            "node",
            "--name",
            name,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=_child_env(),
        )
    finally:
        out.close()  # the child has its own copy
    node = NodeProc(name, proc, log_path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        m = _ready_line(log_path)
        if m:
            node.endpoint = m.group(2)
            node.health_port = None if m.group(3) == "off" else int(m.group(3))
            return node
        if proc.returncode is not None or loop.time() > deadline:
            await _reap(proc)
            why = f"exited with {proc.returncode}" if proc.returncode else f"not ready within {timeout:g} s"
            raise RuntimeError(f"node {name} {why}:\n{node.log_tail()}")
        await asyncio.sleep(0.05)


class Mesh:
    """Three node processes on loopback; the victim serves the service."""

    def __init__(self, workdir: Path, certs: dict[str, NodeCert], extra_args: list[str]):
        self.workdir = workdir
        self.certs = certs
        self.extra_args = extra_args
        self.nodes: list[NodeProc] = []

    @property
    def victim(self) -> NodeProc:
        return self.nodes[0]

    async def start(self) -> None:
        common = [
            "--listen",
            "quic://127.0.0.1:0",
            "--realm",
            REALM,
            "--certs-dir",
            str(self.certs[VICTIM].ca.parent),
        ]
        victim = await start_node(
            VICTIM,
            [
                *common,
                "--health-listen",
                "127.0.0.1:0",
                "--serve",
                f"{SERVICE}=calculator",
                *self.extra_args,
            ],
            self.workdir / f"{VICTIM}.log",
        )
        self.nodes.append(victim)
        others = await asyncio.gather(
            *(
                start_node(
                    name,
                    [*common, "--health-listen", "off", "--bootstrap", victim.endpoint, *self.extra_args],
                    self.workdir / f"{name}.log",
                )
                for name in OTHERS
            ),
            return_exceptions=True,
        )
        for other in others:
            if isinstance(other, BaseException):
                raise other
            self.nodes.append(other)

    async def stop(self) -> None:
        await asyncio.gather(*(_reap(n.proc) for n in self.nodes), return_exceptions=True)


# ==================================================================== victim
class Sampler:
    """The victim's RSS every ``SAMPLE_EVERY`` seconds, in the background."""

    def __init__(self, node: NodeProc):
        self.node = node
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.samples.append((loop.time(), self.node.rss_bytes()))
            await asyncio.sleep(SAMPLE_EVERY)

    def peak(self, t0: float, t1: float) -> int:
        return max((rss for t, rss in self.samples if t0 <= t <= t1), default=0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass
class Mark:
    """The victim at one instant."""

    t: float
    rss: int
    cpu: float
    log: int

    @classmethod
    def now(cls, node: NodeProc) -> Mark:
        return cls(asyncio.get_running_loop().time(), node.rss_bytes(), node.cpu_seconds(), node.log_bytes())


_METRIC = re.compile(r"^(macula_[a-z_]+)(?:\{[^}]*\})? ([-+0-9.eE]+|NaN)$")


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3.0) as resp:  # noqa: S310
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:  # counters are exposed with a _total suffix
            out[m.group(1).removesuffix("_total")] = float(m.group(2))
    return out


async def victim_metrics(node: NodeProc) -> dict[str, float] | str:
    """The victim's ``/metrics`` gauges and counters, or why they could not be read."""
    if node.health_port is None:
        return "no health port"
    try:
        return await asyncio.to_thread(_scrape, node.health_port)
    except Exception as exc:  # refused, timed out: itself a finding under a flood
        return f"{type(exc).__name__}: {exc}"[:80]


# ========================================================== legitimate load
@dataclass
class Load:
    """What the legitimate caller saw in one phase."""

    calls: int = 0
    ok: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # every call; a failed one is inf
    errors: dict[str, int] = field(default_factory=dict)
    discovers: int = 0
    discovers_ok: int = 0  # the victim found, at its real endpoint
    providers_max: int = 0

    def pct(self, q: float) -> float:
        return _common.percentile(sorted(self.latencies_ms), q)

    @property
    def success(self) -> float:
        return self.ok / self.calls if self.calls else math.nan


async def attach_caller(url: str, certs: dict[str, NodeCert]) -> macula_lab.Client:
    """The legitimate caller: an attached client of the victim, verifying it against the lab CA.

    It presents the ``caller`` certificate if ``macula_lab.connect`` takes one
    (mutual TLS); this is the one place to adapt if that signature changes.
    """
    kw: dict[str, Any] = {}
    accepted = inspect.signature(macula_lab.connect).parameters
    if "cert" in accepted and "key" in accepted:
        kw = {"cert": str(certs[CALLER].cert), "key": str(certs[CALLER].key)}
    return await macula_lab.connect(
        url, realm=REALM, ca=str(certs[CALLER].ca), name=CALLER, timeout=10.0, **kw
    )


async def legit_load(
    client: macula_lab.Client,
    *,
    duration: float,
    rate: float,
    call_timeout: float,
    discover_every: float,
    victim_id: bytes,
    victim_endpoint: str,
) -> Load:
    """``rate`` calls/s for ``duration`` s, open loop; a discovery refresh every ``discover_every`` s."""
    loop = asyncio.get_running_loop()
    load = Load()
    errors: collections.Counter[str] = collections.Counter()
    n = max(1, round(duration * rate))
    start = loop.time() + 0.01

    async def call(i: int, intended: float) -> None:
        a = i % 1000
        try:
            async with asyncio.timeout_at(intended + call_timeout):
                result = await client.call(
                    SERVICE, {"operation": "add", "a": a, "b": 1}, timeout=call_timeout
                )
        except TimeoutError:
            errors[f"no answer within {call_timeout:g} s"] += 1
        except Exception as exc:
            errors[type(exc).__name__] += 1
        else:
            if result == {"result": a + 1, "node": VICTIM}:
                load.ok += 1
                load.latencies_ms.append((loop.time() - intended) * 1000)
                return
            errors["wrong result"] += 1
        load.latencies_ms.append(math.inf)

    async def discover(intended: float) -> None:
        load.discovers += 1
        try:
            async with asyncio.timeout_at(intended + call_timeout):
                entries = await client.discover(SERVICE, refresh=True)
        except Exception:
            return
        load.providers_max = max(load.providers_max, len(entries))
        if any(e.node_id == victim_id and e.endpoint == victim_endpoint for e in entries):
            load.discovers_ok += 1

    async def discoveries() -> list[asyncio.Task]:
        tasks = []
        if discover_every <= 0:
            return tasks
        for j in range(max(1, int(duration / discover_every))):
            intended = start + j * discover_every
            await asyncio.sleep(max(0.0, intended - loop.time()))
            tasks.append(loop.create_task(discover(intended)))
        return tasks

    disc = loop.create_task(discoveries())
    calls = []
    for i in range(n):
        intended = start + i / rate
        delay = intended - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        calls.append(loop.create_task(call(i, intended)))  # late: still timed from `intended`
    load.calls = n
    await asyncio.gather(*calls, *(await disc))
    load.errors = dict(errors)
    return load


async def probe_advertise(client: macula_lab.Client, name: str, timeout: float) -> int | str:
    """Advertise ``name`` through the victim and withdraw it; the replica count (or the error)."""
    try:
        async with asyncio.timeout(timeout):
            replicas = await client.advertise(name, lambda args: args, ttl=60.0)
    except Exception as exc:
        return type(exc).__name__
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await client.unadvertise(name)
    return replicas


# ================================================================== flooder
def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


class Flooder:
    """The flooder process (bench/_flooder.py), driven over its stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @classmethod
    async def start(cls, config: dict[str, Any], path: Path, timeout: float) -> Flooder:
        _write_text(path, json.dumps(config))
        proc = await _spawn(
            sys.executable,
            str(FLOODER),
            str(path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_child_env(),
        )
        flooder = cls(proc)
        await flooder._expect("ready", timeout)
        return flooder

    async def _expect(self, event: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(
                        f"the flooder exited (status {await self.proc.wait()}) before {event!r}"
                    )
                with contextlib.suppress(ValueError):
                    msg = json.loads(line)
                    if isinstance(msg, dict) and msg.get("event") == event:
                        return msg

    async def _say(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word.encode() + b"\n")
        await self.proc.stdin.drain()

    async def go(self) -> None:
        await self._say("go")
        await self._expect("started", 30.0)

    async def stop(self) -> dict[str, Any]:
        """Ask for the report; the flooder then closes its connections and exits."""
        try:
            await self._say("stop")
            report = (await self._expect("report", 60.0))["attacks"]
            await asyncio.wait_for(self.proc.wait(), 15.0)
            return report
        finally:
            await _reap(self.proc)


def flood_plan(attack: str, args: argparse.Namespace) -> dict[str, Any]:
    """What the flooder sends in the flood phase of ``attack`` (``all``: everything, idle with a certificate)."""
    plans = {
        "halfopen": {"halfopen": args.halfopen},
        "idle": {"idle": args.idle},
        "idle-nocert": {"idle": args.idle},
        "store": {"store": args.stores},
        "badframe": {"badframe": args.bad_frames},
        "partial": {"partial": args.partial_mib},
    }
    if attack == "all":
        return {k: v for name, plan in plans.items() if name != "idle-nocert" for k, v in plan.items()}
    return plans[attack]


def _attack_line(name: str, st: dict[str, Any]) -> str:
    """The main figures of one attack (popped from ``st``; what is left is listed after them)."""
    if name == "halfopen":
        return (
            f"{st.pop('sent', 0)}/{st.pop('planned', 0)} Initials sent, {st.pop('datagrams_back', 0)} "
            f"datagrams ({st.pop('bytes_back', 0) // 1024} KiB) came back"
        )
    if name == "idle":
        return f"{st.pop('connected', 0)}/{st.pop('planned', 0)} connections completed TLS"
    if name == "store":
        return (
            f"{st.pop('sent', 0)}/{st.pop('planned', 0)} STOREs sent; "
            f"{st.pop('stored', 0)} stored, {st.pop('refused', 0)} refused"
        )
    if name == "badframe":
        return (
            f"{st.pop('sent', 0)}/{st.pop('planned', 0)} bad frames sent ({st.pop('sent_stream_fatal', 0)} "
            f"stream-fatal) on {st.pop('connections', 0)} connection(s)"
        )
    if name == "partial":
        return (
            f"{st.pop('streams', 0)}/{st.pop('planned_streams', 0)} streams each holding an unfinished "
            f"frame ({st.pop('bytes_queued', 0) / MIB:.0f} MiB queued)"
        )
    return ""


def flood_summary(report: dict[str, Any]) -> list[str]:
    """One line per attack from the flooder's report: what was sent, what the victim answered."""
    out = []
    for name, counts in report.items():
        st = dict(counts)
        main = _attack_line(name, st)
        st.pop("sent_per_frame", None)
        rest = ", ".join(f"{k} {v}" for k, v in sorted(st.items()))
        out.append(f"{name}: {main}" + (f"; {rest}" if rest else ""))
    return out


# ================================================================ one round
@dataclass
class Phase:
    name: str
    load: Load
    rss_before: int
    rss_peak: int
    rss_after: int
    cpu_s: float
    log_bytes: int
    metrics: dict[str, float] | str = ""  # the victim's /metrics at the end of the phase
    metrics_after: dict[str, float] | str = ""  # flood: --settle seconds after the flooder left
    probe: int | str = "-"  # replicas stored for a new service advertised through the victim

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["load"] = {k: v for k, v in asdict(self.load).items() if k != "latencies_ms"} | {
            "success": self.load.success,
            "p50_ms": self.load.pct(50),
            "p99_ms": self.load.pct(99),
        }
        return d


@dataclass
class Round:
    attack: str
    quiet: Phase | None = None
    flood: Phase | None = None
    flooder: dict[str, Any] = field(default_factory=dict)
    victim_exit: int | None = None  # the victim's exit status if it died during the round
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "quiet": self.quiet.to_json() if self.quiet else None,
            "flood": self.flood.to_json() if self.flood else None,
            "flooder": self.flooder,
            "victim_exit": self.victim_exit,
            "error": self.error,
        }


def phase_from(name: str, load: Load, a: Mark, b: Mark, c: Mark, sampler: Sampler) -> Phase:
    """Phase stats: RSS ``a`` -> peak over [a, c] -> ``c``; CPU over [a, b]; log bytes over [a, c]."""
    return Phase(
        name, load, a.rss, max(sampler.peak(a.t, c.t), a.rss, c.rss), c.rss, b.cpu - a.cpu, c.log - a.log
    )


class Blackholes:
    """UDP sockets on loopback that never answer: the forged providers' endpoints point here."""

    def __init__(self, n: int = 4):
        self.socks = []
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            self.socks.append(s)

    @property
    def endpoints(self) -> list[str]:
        return [f"quic://127.0.0.1:{s.getsockname()[1]}" for s in self.socks]

    def close(self) -> None:
        for s in self.socks:
            s.close()


async def run_round(attack: str, args: argparse.Namespace, tmp: Path, certs: dict[str, NodeCert]) -> Round:
    rnd = Round(attack)
    workdir = tmp / attack
    workdir.mkdir()
    node_args = ["--max-frame-size", str(args.max_frame_size), *shlex.split(args.node_args)]
    mesh = Mesh(workdir, certs, node_args)
    holes = Blackholes(max(4, args.store_identities))
    client: macula_lab.Client | None = None
    flooder: Flooder | None = None
    sampler: Sampler | None = None
    tag = f"[{attack}]"
    try:
        t0 = time.perf_counter()
        await mesh.start()
        victim = mesh.victim
        log(
            f"{tag} mesh up in {time.perf_counter() - t0:.1f} s: victim {VICTIM} pid {victim.pid} at {victim.endpoint}"
        )
        client = await attach_caller(victim.endpoint, certs)
        victim_id = client.peer.node_id  # as the victim introduced itself (CONNECT_ACK)
        load_kw = dict(
            duration=args.duration,
            rate=args.rate,
            call_timeout=args.call_timeout,
            discover_every=args.discover_every,
            victim_id=victim_id,
            victim_endpoint=victim.endpoint,
        )
        for i in range(10):  # warm-up: session, discovery cache, allocator
            await client.call(SERVICE, {"operation": "add", "a": i, "b": 1}, timeout=args.call_timeout)
        await client.discover(SERVICE, refresh=True)
        sampler = Sampler(victim)
        sampler.start()

        host, port = victim.endpoint.removeprefix("quic://").rsplit(":", 1)
        config = {
            "victim_host": host,
            "victim_port": int(port),
            "realm": REALM,
            "cert": str(certs[FLOODER_CERT].cert),
            "key": str(certs[FLOODER_CERT].key),
            "idle_cert": attack != "idle-nocert" and not args.no_cert,
            "use_cert": not args.no_cert,
            "service_key": service_key(REALM, SERVICE).hex(),
            "victim_id": victim_id.hex(),
            "blackholes": holes.endpoints,
            "store_service": args.store_service,
            "store_identities": args.store_identities,
            "max_frame_size": args.max_frame_size,
            "window": args.duration * args.flood_window,
            "attacks": flood_plan(attack, args),
        }
        t0 = time.perf_counter()
        flooder = await Flooder.start(config, workdir / "flooder.json", timeout=args.setup_timeout)
        log(f"{tag} flooder ready in {time.perf_counter() - t0:.1f} s")

        # ---- quiet
        await asyncio.sleep(0.5)  # let the flooder's preparation leave the CPU
        a = Mark.now(victim)
        load = await legit_load(client, **load_kw)
        b = Mark.now(victim)
        rnd.quiet = phase_from("quiet", load, a, b, b, sampler)
        rnd.quiet.metrics = await victim_metrics(victim)
        rnd.quiet.probe = await probe(client, "quiet", args.call_timeout)
        log_phase(tag, rnd.quiet)

        # ---- flood
        a = Mark.now(victim)
        await flooder.go()
        load = await legit_load(client, **load_kw)
        b = Mark.now(victim)
        metrics = await victim_metrics(victim)
        probe_replicas = await probe(client, "flood", args.call_timeout)
        rnd.flooder = await flooder.stop()
        flooder = None
        # ---- after
        await asyncio.sleep(args.settle)
        c = Mark.now(victim)
        rnd.flood = phase_from(attack, load, a, b, c, sampler)
        rnd.flood.metrics, rnd.flood.probe = metrics, probe_replicas
        rnd.flood.metrics_after = await victim_metrics(victim)
        if victim.proc.returncode is not None:
            rnd.victim_exit = victim.proc.returncode
        log_phase(tag, rnd.flood)
        for line in flood_summary(rnd.flooder):
            log(f"{tag}   {line}")
    except Exception as exc:
        rnd.error = f"{type(exc).__name__}: {exc}"
        log(f"{tag} CRASHED\n{traceback.format_exc()}")
    finally:
        if flooder is not None:
            with contextlib.suppress(Exception):
                await _reap(flooder.proc, timeout=5.0)
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 10.0)
        if sampler is not None:
            await sampler.stop()
        await mesh.stop()
        holes.close()
        if args.keep_logs:
            _keep_logs(workdir, Path(args.keep_logs) / attack)
    return rnd


def _keep_logs(workdir: Path, dest: Path) -> None:
    """Copy the nodes' logs and the flooder's configuration of a round to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in workdir.iterdir():
        if f.suffix in (".log", ".json"):
            shutil.copyfile(f, dest / f.name)


async def probe(client: macula_lab.Client, phase: str, timeout: float) -> int | str:
    """Can a genuine provider still be stored?  Replicas of a new service advertised through the victim.

    (Only a new name: advertising the victim's own service through it would replace
    the victim's handler, and withdrawing it would withdraw the victim's service.)
    """
    return await probe_advertise(client, f"probe.{phase}", timeout)


def log_phase(tag: str, p: Phase) -> None:
    log(
        f"{tag} {p.name:<12} {p.load.calls} calls, {p.load.success:7.2%} ok, p50 {fmt_ms(p.load.pct(50))} ms, "
        f"p99 {fmt_ms(p.load.pct(99))} ms, RSS {p.rss_before / MIB:.1f} -> {p.rss_peak / MIB:.1f} -> "
        f"{p.rss_after / MIB:.1f} MiB, CPU {p.cpu_s:.2f} s, log {p.log_bytes} B"
        + (f", errors {p.load.errors}" if p.load.errors else "")
    )


async def run_all(args: argparse.Namespace) -> list[Round]:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)  # SIGTERM cleans up like Ctrl-C
    rounds = []
    with tempfile.TemporaryDirectory(prefix="macula-hostile-") as tmp:
        # node certificates name 127.0.0.1 (where the mesh listens); the flooder holds one too: a
        # compromised lab node, the strongest attacker a lab CA admits
        certs = lab_certs(Path(tmp) / "certs", [VICTIM, *OTHERS, CALLER, FLOODER_CERT], ips=["127.0.0.1"])
        for i, attack in enumerate(args.attack_list, 1):
            log(f"[{attack}] round {i}/{len(args.attack_list)}")
            rounds.append(await run_round(attack, args, Path(tmp), certs))
    return rounds


# ==================================================================== report
def fmt_ms(v: float) -> str:
    if math.isnan(v):
        return "n/a"
    return "inf" if math.isinf(v) else f"{v:.1f}"


def fmt_mib(b: int) -> str:
    return f"{b / MIB:.1f}"


@dataclass
class Verdict:
    label: str
    value: float
    shown: str
    target: str
    verdict: str


def verdicts(rounds: list[Round]) -> list[Verdict]:
    out = []
    for r in rounds:
        if r.quiet is None or r.flood is None:
            continue
        ok = r.flood.load.success
        ratio = r.flood.load.pct(50) / r.quiet.load.pct(50)
        growth = (r.flood.rss_peak - r.flood.rss_before) / MIB
        out += [
            Verdict(
                f"{r.attack}: legitimate success during the flood",
                ok,
                f"{ok:.1%}",
                "= 100%",
                _common.verdict(ok, ok >= TARGET_SUCCESS),
            ),
            Verdict(
                f"{r.attack}: flood p50 / quiet p50",
                ratio,
                "inf" if math.isinf(ratio) else f"{ratio:.2f}x",
                f"<= {TARGET_P50_RATIO:.1f}x",
                _common.verdict(ratio, ratio <= TARGET_P50_RATIO),
            ),
            Verdict(
                f"{r.attack}: victim RSS growth (peak - before)",
                growth,
                f"{growth:+.1f} MiB",
                "-",
                _common.verdict(growth, True, judged=False),
            ),
        ]
    return out


def _metric(m: dict[str, float] | str, name: str) -> str:
    if isinstance(m, str):
        return "n/a"
    v = m.get(name)
    return "-" if v is None else f"{v:.0f}"


def report(rounds: list[Round], rows: list[Verdict], env: dict[str, Any], args: argparse.Namespace) -> str:
    main_rows, state_rows, details = [], [], []
    for r in rounds:
        if r.error is not None and r.flood is None:
            main_rows.append([r.attack, "CRASHED", *[""] * 9])
        for p in (r.quiet, r.flood):
            if p is None:
                continue
            label = f"quiet ({r.attack})" if p.name == "quiet" else r.attack
            main_rows.append(
                [
                    label,
                    str(p.load.calls),
                    f"{p.load.success:.1%}",
                    fmt_ms(p.load.pct(50)),
                    fmt_ms(p.load.pct(99)),
                    fmt_mib(p.rss_before),
                    fmt_mib(p.rss_peak),
                    fmt_mib(p.rss_after),
                    f"{p.cpu_s:.2f}",
                    str(p.log_bytes),
                    f"{p.load.discovers_ok}/{p.load.discovers}",
                ]
            )
            state_rows.append(
                [
                    label,
                    _metric(p.metrics, "macula_incoming_connections"),
                    _metric(p.metrics_after, "macula_incoming_connections") if p.metrics_after else "",
                    _metric(p.metrics, "macula_dht_keys"),
                    _metric(p.metrics, "macula_bad_frames"),
                    str(p.load.providers_max),
                    str(p.probe),
                ]
            )
        if r.flood is not None:
            details += [f"{r.attack}:"] + [f"  {line}" for line in flood_summary(r.flooder)]
            for p in (r.quiet, r.flood):
                if p is not None and p.load.errors:
                    details.append(f"  failed legitimate calls ({p.name}): {p.load.errors}")
            if r.victim_exit is not None:
                details.append(f"  THE VICTIM EXITED during the flood (status {r.victim_exit})")
            if isinstance(r.flood.metrics, str):
                details.append(f"  /metrics during the flood: {r.flood.metrics}")
    lines = [
        _common.environment_line(env, ["aioquic", "msgpack"]),
        f"workload: 3 `macula-lab node` processes on loopback (lab CA, TLS 1.3), victim {VICTIM} serving "
        f"{SERVICE}; caller: attached client of the victim, {args.rate:g} calls/s open loop, "
        f"discovery refresh every {args.discover_every:g} s, {args.call_timeout:g} s per call",
        f"phases: a fresh mesh per attack; {args.duration:g} s quiet, then {args.duration:g} s flood "
        f"(sends spread over {args.duration * args.flood_window:g} s), then {args.settle:g} s after the "
        "flooder left; latency from each call's intended send time, a failed call counts as inf",
        f"flood sizes: {args.halfopen} half-open handshakes, {args.idle} idle connections, "
        f"{args.stores} STOREs ({args.store_service} under the service key, from {args.store_identities} "
        f"claimed node identities), {args.bad_frames} bad frames, "
        f"{args.partial_mib} unfinished 1 MiB frames",
        "",
        *_common.table(
            [
                "phase".ljust(19),
                "calls",
                "success",
                "p50 ms",
                "p99 ms",
                "RSS before MiB",
                "RSS peak MiB",
                "RSS after MiB",
                "CPU s",
                "log bytes",
                "discover ok",
            ],
            main_rows,
        ),
        "",
        "victim at the end of each phase (/metrics; conns after: incoming connections "
        f"{args.settle:g} s after the flooder left; providers: most returned by one discovery; "
        "probe ad: replicas stored for a new service advertised through the victim):",
        "",
        *_common.table(
            [
                "phase".ljust(19),
                "incoming conns",
                "conns after",
                "DHT keys",
                "bad frames",
                "providers",
                "probe ad",
            ],
            state_rows,
        ),
        "",
        *details,
        "",
        *_common.verdict_lines((v.label, v.shown, v.target, v.verdict) for v in rows),
    ]
    return "\n".join(lines)


# ======================================================================= CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _common.parser(__doc__)
    p.add_argument(
        "--duration", type=float, default=10.0, help="seconds of each quiet and flood phase (default 10)"
    )
    p.add_argument("--rate", type=float, default=50.0, help="legitimate calls per second (default 50)")
    p.add_argument(
        "--only",
        default="",
        help=f"comma-separated attacks to run (default: all of {', '.join(ATTACKS)}; 'all' is the combined flood)",
    )
    p.add_argument("--halfopen", type=int, default=1000, help="half-open QUIC handshakes (default 1000)")
    p.add_argument("--idle", type=int, default=500, help="idle QUIC connections (default 500)")
    p.add_argument("--stores", type=int, default=12000, help="forged STORE frames (default 12000)")
    p.add_argument(
        "--store-service",
        type=int,
        default=150,
        help="of which under the victim's service key, one naming the victim itself (default 150)",
    )
    p.add_argument(
        "--store-identities",
        type=int,
        default=12,
        help="node identities the STOREs are spread over, a new connection and claimed node id each "
        "(default 12)",
    )
    p.add_argument("--bad-frames", type=int, default=5000, help="malformed frames (default 5000)")
    p.add_argument(
        "--partial-mib",
        type=int,
        default=16,
        help="streams each pinning an unfinished 1 MiB frame (default 16)",
    )
    p.add_argument(
        "--flood-window",
        type=float,
        default=0.8,
        help="fraction of --duration over which the flooder spreads its sends (default 0.8)",
    )
    p.add_argument(
        "--settle", type=float, default=3.0, help="seconds after the flood before RSS 'after' (default 3)"
    )
    p.add_argument(
        "--call-timeout",
        type=float,
        default=5.0,
        help="a legitimate call fails after this many seconds (default 5)",
    )
    p.add_argument(
        "--discover-every",
        type=float,
        default=1.0,
        help="seconds between the caller's discovery refreshes, 0 for none (default 1)",
    )
    p.add_argument(
        "--no-cert",
        action="store_true",
        help="the flooder presents no client certificate in any attack (default: only in idle-nocert)",
    )
    p.add_argument(
        "--max-frame-size",
        type=int,
        default=1 << 20,
        help="the nodes' frame limit, passed to them; the unfinished frames announce it (default 1 MiB)",
    )
    p.add_argument(
        "--node-args",
        default="",
        help="extra `macula-lab node` arguments for every node (one shell-quoted string)",
    )
    p.add_argument(
        "--keep-logs", metavar="DIR", help="copy each round's node logs and flooder config to DIR/<attack>/"
    )
    p.add_argument("--setup-timeout", type=float, default=180.0, help="seconds for the flooder's preparation")
    _common.add_json_option(p)
    args = p.parse_args(argv)
    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        p.error(f"unknown attack(s) {unknown}; choose from {list(ATTACKS)}")
    args.attack_list = names
    if args.duration <= 0 or args.rate <= 0 or args.call_timeout <= 0:
        p.error("--duration, --rate and --call-timeout must be > 0")
    if not 0 < args.flood_window <= 1:
        p.error("--flood-window must be in (0, 1]")
    if min(args.halfopen, args.idle, args.stores, args.store_service, args.bad_frames, args.partial_mib) < 0:
        p.error("flood sizes must be >= 0")
    if args.store_identities < 1:
        p.error("--store-identities must be >= 1")
    if args.settle < 0 or args.discover_every < 0:
        p.error("--settle and --discover-every must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = _common.environment("aioquic", "msgpack")
    # Ctrl-C stops the run and cleans up, even if SIGINT was ignored by whoever started us
    # (a background job of a script); asyncio.run then turns it into a cancellation
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rounds = _common.run_timed(run_all(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: child processes stopped, temporary files removed")
        return 130
    finally:
        _kill_leftovers()
    rows = verdicts(rounds)
    print(report(rounds, rows, env, args))
    if args.json:
        doc = {
            "environment": env,
            "config": {k: v for k, v in vars(args).items()},
            "rounds": [r.to_json() for r in rounds],
            "verdicts": [asdict(v) for v in rows],
        }
        _common.write_json(args.json, doc)
        log(f"wrote {args.json}")
    return 1 if any(r.error is not None for r in rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
