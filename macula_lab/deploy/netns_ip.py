"""Linux plumbing for :mod:`macula_lab.deploy.netns`: namespaces, a bridge, veth pairs, and their removal.

Synchronous on purpose (each ``ip`` command takes milliseconds and has a
timeout): the same code runs from the async harness (in a worker thread), from
the command line, and from an ``atexit`` hook when the event loop is gone.

A *run* is one harness instance.  Everything it creates is named after its
random 6-hex run id, so runs in parallel and leftovers of crashed runs never
clash, and leftovers can be recognised by name alone:

    namespace  mlab-<run>-<i>      (the node inside sees its side of the veth as eth0)
    bridge     mlb<run>            in the root namespace, holding the subnet's .1
    veth       mlv<run><i>         root-namespace side, enslaved to the bridge
    hosts      /etc/netns/mlab-<run>-<i>/hosts   (``ip netns exec`` mounts it on /etc/hosts)

A state file ``/run/macula-lab-netns/<run>.json`` records the owning process;
:func:`clean_stale` removes every run whose owner is gone (and, with
``everything=True``, every run at all).  Each run takes a free ``/24`` of
``172.20.0.0/16`` (the compose file's network), chosen under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MaculaError

STATE_DIR = Path(os.environ.get("MACULA_NETNS_STATE", "/run/macula-lab-netns"))
NETNS_ETC = Path("/etc/netns")
BASE_NETWORK = ipaddress.ip_network("172.20.0.0/16")
PREFIX = 24
IP_TIMEOUT = 10.0
NS_RE = re.compile(r"^mlab-(?P<run>[0-9a-f]{6})-(?P<i>\d+)$")
LINK_RE = re.compile(r"^ml[bv](?P<run>[0-9a-f]{6})\d*$")


class NetnsError(MaculaError):
    """An ``ip`` command failed, or the network could not be set up or removed."""

    code = "netns_error"


class NetnsUnavailable(NetnsError):
    """Network namespaces cannot be used here (not Linux, not root, no ``ip netns``)."""

    code = "netns_unavailable"


# ------------------------------------------------------------------ commands
def ip(*args: str, ns: str | None = None, check: bool = True, timeout: float = IP_TIMEOUT) -> str:
    """Run ``ip [-n NS] ARGS``; its stdout, or :class:`NetnsError` with its stderr."""
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{' '.join(cmd)}` did not finish within {timeout:g}s") from None
    if check and done.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None when they can (probes with a throwaway one)."""
    if not os.uname().sysname == "Linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or in CI which runs as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed: apt-get install iproute2"
    probe = f"mlab-{secrets.token_hex(3)}-0"
    try:
        ip("netns", "add", probe)
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        ip("link", "set", "lo", "up", ns=probe)
    except NetnsError as exc:
        return f"cannot configure a network namespace: {exc}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


# ------------------------------------------------------------------ state and locking
@contextlib.contextmanager
def _locked() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _process_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(state: dict) -> bool:
    pid = state.get("pid")
    return isinstance(pid, int) and _process_start(pid) == state.get("start")


@dataclass
class Network:
    """One run's bridge and namespaces (see the module docstring for names)."""

    run: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: ipaddress.IPv4Network | None = None
    namespaces: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"mlb{self.run}"

    @property
    def gateway(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def namespace(self, index: int) -> str:
        return f"mlab-{self.run}-{index}"

    def veth(self, index: int) -> str:
        return f"mlv{self.run}{index}"

    def address(self, host: int) -> str:
        """The address with host part ``host`` in this run's subnet."""
        assert self.subnet is not None
        if not 1 < host < self.subnet.num_addresses - 1:
            raise NetnsError(f"host part {host} does not fit {self.subnet} (.1 is the bridge)")
        return str(self.subnet.network_address + host)

    # -------------------------------------------------------------- up
    def create(self, preferred: ipaddress.IPv4Network | None = None) -> None:
        """Pick a free subnet, record the run, create the bridge (holding ``.1``)."""
        with _locked():
            self.subnet = _free_subnet(preferred)
            self._write_state()
            # a fixed MAC: otherwise the bridge takes its lowest port's MAC and changes it when that
            # port goes (kill_namespace), and the nodes' ARP entries for .1 go stale for seconds
            mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
            ip("link", "add", self.bridge, "address", mac, "type", "bridge", "forward_delay", "0")
            ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")

    def add_namespace(self, index: int, address: str, hosts: Sequence[tuple[str, Sequence[str]]]) -> str:
        """A namespace with ``eth0`` = ``address`` on the bridge, ``lo`` up, and an /etc/hosts of its own."""
        assert self.subnet is not None
        ns, veth, peer = self.namespace(index), self.veth(index), f"mlp{self.run}{index}"
        self.namespaces.append(ns)
        self._write_state()
        _write_hosts(ns, hosts)
        ip("netns", "add", ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", ns)
        ip("link", "set", peer, "name", "eth0", ns=ns)
        ip("link", "set", veth, "master", self.bridge)
        ip("link", "set", veth, "up")
        ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0", ns=ns)
        ip("link", "set", "eth0", "up", ns=ns)
        ip("link", "set", "lo", "up", ns=ns)
        return ns

    def set_link(self, index: int, up: bool) -> None:
        """Cut (or restore) a namespace's cable: its veth on the bridge side goes down (up)."""
        ip("link", "set", self.veth(index), "up" if up else "down")

    def remove_namespace(self, ns: str) -> None:
        """Kill whatever runs in ``ns``, delete it (its veth goes with it) and its /etc/netns files."""
        _remove_namespace(ns)
        if ns in self.namespaces:
            self.namespaces.remove(ns)
            self._write_state()

    # -------------------------------------------------------------- down
    def destroy(self) -> list[str]:
        """Remove everything of this run; returns the problems (empty when all is gone)."""
        return _remove_run(self.run)

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {
            "run": self.run,
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
            "subnet": str(self.subnet),
            "namespaces": self.namespaces,
            "created": time.time(),
        }
        tmp = STATE_DIR / f"{self.run}.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(STATE_DIR / f"{self.run}.json")

    def describe(self) -> dict:
        return {**asdict(self), "subnet": str(self.subnet), "bridge": self.bridge}


def _free_subnet(preferred: ipaddress.IPv4Network | None) -> ipaddress.IPv4Network:
    used = []
    for line in ip("-4", "-o", "addr", "show").splitlines() + ip("-4", "route", "show").splitlines():
        for token in line.split():
            if "/" in token or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", token):
                with contextlib.suppress(ValueError):
                    used.append(ipaddress.ip_network(token, strict=False))
    candidates = [preferred] if preferred else list(BASE_NETWORK.subnets(new_prefix=PREFIX))
    for subnet in candidates:
        if not any(subnet.overlaps(u) for u in used if u.prefixlen > 0):
            return subnet
    if preferred:
        raise NetnsError(f"subnet {preferred} overlaps an address or route already on this machine")
    raise NetnsError(
        f"no free /{PREFIX} in {BASE_NETWORK} (is a compose network using it?); pass subnet=... "
        "(python -m macula_lab.deploy.netns up --subnet ...)"
    )


def _write_hosts(ns: str, hosts: Sequence[tuple[str, Sequence[str]]]) -> None:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{address}\t{' '.join(names)}" for address, names in hosts if names]
    directory = NETNS_ETC / ns
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts").write_text("\n".join(lines) + "\n")


def _remove_namespace(ns: str) -> None:
    pids = ip("netns", "pids", ns, check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:  # a namespace outlives its deletion while in use
        pids = ip("netns", "pids", ns, check=False).split()
        if pids:
            time.sleep(0.05)
    ip("netns", "del", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    if ns in ip("netns", "list", check=False).split():
        raise NetnsError(f"namespace {ns} could not be deleted")


def _remove_run(run: str) -> list[str]:
    problems: list[str] = []
    for ns in list_namespaces(run):
        try:
            _remove_namespace(ns)
        except NetnsError as exc:
            problems.append(str(exc))
    for link in list_links(run):  # veths went with their namespaces; the bridge is left
        try:
            ip("link", "del", link)
        except NetnsError as exc:
            if link in list_links(run):
                problems.append(str(exc))
    for leftover in NETNS_ETC.glob(f"mlab-{run}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not problems:
        with contextlib.suppress(FileNotFoundError):
            (STATE_DIR / f"{run}.json").unlink()
    return problems


# ------------------------------------------------------------------ leftovers
def list_namespaces(run: str | None = None) -> list[str]:
    names = [line.split()[0] for line in ip("netns", "list", check=False).splitlines() if line.strip()]
    return [n for n in names if (m := NS_RE.match(n)) and (run is None or m["run"] == run)]


def list_links(run: str | None = None) -> list[str]:
    links = []
    for line in ip("-o", "link", "show", check=False).splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if (m := LINK_RE.match(name)) and (run is None or m["run"] == run):
                links.append(name)
    return links


def runs() -> dict[str, dict]:
    """Every run with something left on this machine: ``run -> state`` (``alive``: its owner runs)."""
    found: dict[str, dict] = {}
    if STATE_DIR.is_dir():
        for path in STATE_DIR.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(path.read_text())
                found[state["run"]] = state
    for name in list_namespaces() + list_links():
        m = NS_RE.match(name) or LINK_RE.match(name)
        if m:
            found.setdefault(m["run"], {"run": m["run"]})
    for state in found.values():
        state["alive"] = _owner_alive(state)
    return found


def clean_stale(*, everything: bool = False) -> dict[str, list[str]]:
    """Remove the runs whose owner process is gone (all runs with ``everything``): ``run -> problems``."""
    removed: dict[str, list[str]] = {}
    with _locked():
        for run, state in runs().items():
            if everything or not state["alive"]:
                removed[run] = _remove_run(run)
    return removed
