"""The dashboard in a real browser: JupyterLab + Debian's chromium driven by Playwright.

The test starts JupyterLab on a free port (token, temporary root with a copy of
``notebooks/lab_dashboard.ipynb``, temporary settings), opens the notebook, runs
all cells, clicks *advertise* then *call* in the widgets, waits for the result
text and for the RPC round-trip chart to get its point, and saves a screenshot
to ``test-artifacts/`` (also on failure, for diagnosis).  It uses the system
chromium (``/usr/bin/chromium``, installed by ``.ci/run``), never a downloaded
browser, and is skipped only when that is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "lab_dashboard.ipynb"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("MACULA_CHROMIUM", "/usr/bin/chromium")
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run does it)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Jupyter:
    base: str
    token: str
    root: Path

    def write(self, name: str, *cells: str) -> str:
        """A notebook of these code cells in the server's root; returns its URL path."""
        import nbformat

        nb = nbformat.v4.new_notebook(
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
        )
        nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
        nbformat.write(nb, self.root / name)
        return f"{self.base}/lab/tree/{name}?token={self.token}"


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on a free port; yields (base_url, token); stops it and its kernels."""
    root, settings = tmp_path / "root", tmp_path / "settings"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    # render every cell (no windowing) so the widgets' DOM is always there to find; no news toast
    for plugin, values in {
        "notebook-extension/tracker": {"windowingMode": "none"},
        "apputils-extension/notification": {"fetchNews": "false"},
    }.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--ServerApp.open_browser=False",
    ]  # fmt: skip
    log = open(tmp_path / "jupyterlab.log", "wb")  # closed in the finally below
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError("JupyterLab exited:\n" + (tmp_path / "jupyterlab.log").read_text())
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise AssertionError(
                    "JupyterLab not up in 60 s:\n" + (tmp_path / "jupyterlab.log").read_text()
                )
            time.sleep(0.2)
        yield Jupyter(base, token, root)
    finally:
        # the server and its kernels are in the session we started: stop them all
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a kernel that outlived the server
        log.close()


KERNEL_IDLE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const s = w && w.sessionContext;
  return !!(s && s.session && s.session.kernel && s.session.kernel.connectionStatus === 'connected'
            && s.kernelDisplayStatus === 'idle');
}"""

RTT_POINTS = """() => {
  const gd = document.querySelector('.macula-metrics .js-plotly-plot');
  if (!gd || !gd._fullData) return -1;
  return gd._fullData.filter(t => t.meta === 'rpc_rtt_ms')
                     .reduce((n, t) => n + (t.y ? t.y.length : 0), 0);
}"""


def test_dashboard_in_chromium(jupyterlab):
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab.base, jupyterlab.token
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "browser-dashboard.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 2700})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(f"{base}/lab/tree/lab_dashboard.ipynb?token={token}")
            page.wait_for_function(KERNEL_IDLE, timeout=TIMEOUT_MS)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")

            advertise = page.locator(".macula-advertise-button")
            advertise.wait_for(state="visible")
            advertise.click()
            page.locator(
                ".macula-advertise-status", has_text="advertised test.calculator from node-1"
            ).wait_for()

            assert page.evaluate(RTT_POINTS) <= 0  # no call yet
            page.locator(".macula-call-button").click()
            result = page.locator(".macula-call-result")
            result.filter(has_text='"result": 15').wait_for()
            assert "node-1" in result.inner_text()
            page.locator(".macula-call-status", has_text="answered by node-1").wait_for()

            # the metrics chart gets the call's round trip at the next sampling pass
            page.wait_for_function(f"({RTT_POINTS})() >= 1", timeout=TIMEOUT_MS)
            page.locator(".macula-metrics .js-plotly-plot .scatterlayer .trace .points path").first.wait_for()
            page.locator(".macula-ttl-ads", has_text="test.calculator").wait_for()
            page.locator(".macula-dashboard").scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=True)
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / "browser-dashboard-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


#: a plot's traces as drawn: [{meta, points}] (-1: no plotly plot in that view yet)
DRAWN = """(sel, i) => {
  const gd = document.querySelectorAll(sel + ' .js-plotly-plot')[i || 0];
  if (!gd || !gd._fullData) return -1;
  return gd._fullData.map(t => ({meta: t.meta, points: t.x ? t.x.length : 0}));
}"""

#: browser console lines that mean a plot was drawn wrong (issue 15, items 1 and 2)
PLOT_ERRORS = ("Cannot use 'in' operator", "is not a number or is out of bounds", "bad format", "model not found")


class Console:
    def __init__(self, page):
        self.lines: list[str] = []
        page.on("console", lambda m: self.lines.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.lines.append(f"pageerror: {e}"))

    def plot_errors(self) -> list[str]:
        return [line for line in self.lines if any(e in line for e in PLOT_ERRORS)]


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])


def _run_all(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function(KERNEL_IDLE, timeout=TIMEOUT_MS)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")


def _wait_nodes_drawn(page, n: int, i: int = 0) -> None:
    """The ``i``-th topology plot draws ``n`` node markers (polls in the page, up to TIMEOUT_MS)."""
    page.wait_for_function(
        f"(() => {{ const d = ({DRAWN})('.macula-topology', {i}); "
        f"return Array.isArray(d) && d.some(t => t.meta === 'nodes' && t.points === {n}); }})()",
        timeout=TIMEOUT_MS,
    )


SAMPLED_LAB = """from macula_lab import Lab
from macula_lab.widgets import TopologyView

lab = await Lab.start(n=3, realm="com.test.browser", transport="memory", sample_interval=None)
await lab.node("node-1").advertise("test.calculator", "calculator", ttl=30)
await lab.node("node-2").call("test.calculator", {"operation": "add", "a": 1, "b": 2})
await lab.sample()
snapshots = await lab.sample()"""


def test_views_made_on_a_sampled_lab_draw(jupyterlab):
    """A topology view and a second dashboard, made after the lab sampled, draw their data."""
    from playwright.sync_api import sync_playwright

    url = jupyterlab.write(
        "sampled.ipynb",
        SAMPLED_LAB,
        "topo = TopologyView(lab)\ntopo",
        "first = lab.dashboard()\nsecond = lab.dashboard()  # running the cell again\nsecond",
    )
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 3200})
        page.set_default_timeout(TIMEOUT_MS)
        console = Console(page)
        try:
            _run_all(page, url)
            _wait_nodes_drawn(page, 3, 0)  # the standalone view
            _wait_nodes_drawn(page, 3, 1)  # the second dashboard's
            # the metrics made on the sampled lab draw its samples (the call's round trip)
            page.wait_for_function(f"({RTT_POINTS})() >= 1", timeout=TIMEOUT_MS)
            page.screenshot(path=str(ARTIFACTS / "browser-topology-sampled-lab.png"), full_page=True)
            assert not console.plot_errors(), console.plot_errors()
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / "browser-topology-sampled-lab-failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def test_dashboard_after_a_reload(jupyterlab):
    """Reload the tab (kernel alive), re-run the dashboard cell: a working dashboard, no plot errors."""
    from playwright.sync_api import sync_playwright

    url = jupyterlab.write(
        "reload.ipynb",
        SAMPLED_LAB.replace("sample_interval=None", "sample_interval=0.5"),
        "dash = lab.dashboard()\ndash",
    )
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2700})
        page.set_default_timeout(TIMEOUT_MS)
        console = Console(page)
        try:
            _run_all(page, url)
            _wait_nodes_drawn(page, 3)
            page.reload()
            page.wait_for_function(KERNEL_IDLE, timeout=TIMEOUT_MS)
            before = len(console.lines)
            # re-run only the dashboard cell: the lab in the kernel lives on
            page.evaluate(
                "() => { const nb = window.jupyterapp.shell.currentWidget.content; nb.activeCellIndex = 1;"
                " return window.jupyterapp.commands.execute('notebook:run-cell'); }"
            )
            _wait_nodes_drawn(page, 3)
            page.wait_for_function(f"({RTT_POINTS})() >= 1", timeout=TIMEOUT_MS)
            page.locator(".macula-call-button").click()
            page.locator(".macula-call-status", has_text="answered by node-1").wait_for()
            page.screenshot(path=str(ARTIFACTS / "browser-dashboard-after-reload.png"), full_page=True)
            errors = [line for line in console.lines[before:] if any(e in line for e in PLOT_ERRORS)]
            assert not errors, errors
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / "browser-dashboard-after-reload-failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def test_dashboard_after_a_kill(jupyterlab):
    """A killed node is greyed in the TTL watch and the topology, and no longer a target."""
    from playwright.sync_api import sync_playwright

    url = jupyterlab.write(
        "kill.ipynb",
        SAMPLED_LAB.replace("sample_interval=None", "sample_interval=0.5")
        + '\nawait lab.node("node-3").advertise("test.calculator", "calculator", ttl=30)\nsnapshots = await lab.sample()',
        "dash = lab.dashboard()\ndash",
        'await lab.kill_node("node-3")',
    )
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2700})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            _run_all(page, url)
            page.locator(".macula-ttl-ads", has_text="node-3 (stopped)").wait_for()
            page.locator(".macula-ttl-ads", has_text="not re-advertised").wait_for()
            page.wait_for_function(
                "() => { const gd = document.querySelector('.macula-topology .js-plotly-plot');"
                " const t = gd && gd._fullData && gd._fullData.find(t => t.meta === 'nodes');"
                " return !!t && t.text.includes('node-3 (stopped)'); }",
                timeout=TIMEOUT_MS,
            )
            page.wait_for_function(
                "() => [...document.querySelectorAll('.macula-call select')[0].options].map(o => o.textContent)"
                ".join(',') === 'node-1,node-2'",
                timeout=TIMEOUT_MS,
            )
            # the plots drew their data, not empty default axes
            page.wait_for_function(f"({RTT_POINTS})() >= 1", timeout=TIMEOUT_MS)
            page.locator(".macula-dashboard").scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "browser-dashboard-after-kill.png"), full_page=True)
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / "browser-dashboard-after-kill-failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def test_report_opens_offline_with_its_header_and_plots(tmp_path):
    """The 01 HTML report: verdict and run header on top, no code, plots drawn, <= 1.5 MB."""
    from playwright.sync_api import sync_playwright

    from macula_lab.procedures.runner import run_procedure

    run = run_procedure("01", output_dir=tmp_path)
    assert run.passed, run.summary()
    size = run.html.stat().st_size
    assert size <= 1_500_000, f"the report is {size / 1e6:.1f} MB"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        # offline: plotly.js must come from beside the report, not from the network
        context = browser.new_context(offline=True, viewport={"width": 1200, "height": 1600})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(run.html.as_uri())
            assert page.title() == "01_local_multi_node: PASSED"
            header = page.locator(".macula-report-header")
            header.wait_for()
            text = header.inner_text()
            for field in ("date", "host", "macula-lab", "git commit", "wall time"):
                assert field in text, text
            page.locator(".macula-report-title", has_text="PASSED").wait_for()
            page.wait_for_function(
                "() => [...document.querySelectorAll('.js-plotly-plot')].some(g => g._fullData && g._fullData.length)",
                timeout=TIMEOUT_MS,
            )
            assert page.locator(".jp-CodeCell .jp-InputArea").count() == 0  # outputs only, no code
            page.screenshot(path=str(ARTIFACTS / "browser-report-header.png"))
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / "browser-report-failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def test_quickstart_run_all_leaves_a_live_dashboard(jupyterlab):
    """00_quickstart under Run All: after its last cell, its dashboard is still there and live."""
    from playwright.sync_api import sync_playwright

    shutil.copy(ROOT / "notebooks" / "00_quickstart.ipynb", jupyterlab.root / "00_quickstart.ipynb")
    url = f"{jupyterlab.base}/lab/tree/00_quickstart.ipynb?token={jupyterlab.token}"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2700})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            _run_all(page, url)
            page.locator(".jp-OutputArea-output", has_text="all checks passed").wait_for(timeout=3 * TIMEOUT_MS)
            header = page.locator(".macula-dashboard-header")
            header.wait_for()
            assert "nodes running" in header.inner_text()
            page.locator(".macula-call-button").first.wait_for(state="visible")
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / "browser-quickstart-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
