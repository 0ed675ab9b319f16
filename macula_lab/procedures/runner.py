"""``macula-lab procedure NAME -p key value ...``: run a procedure notebook through papermill.

Writes, in ``--output-dir`` (default ``procedure-runs/``):

- ``NAME.ipynb``: the executed notebook (parameters injected by papermill, every
  output kept, the reports as ``application/json`` outputs);
- ``NAME.html``: a static HTML report (nbconvert): a header with the verdict, date,
  host, package version, git commit and parameters, then the outputs (the code too
  with ``--with-input``); no widget state (live widgets need a kernel), and
  plotly.js loaded once from ``plotly.min.js`` beside it (the CDN as a fallback)
  instead of inline, so a report stays small;
- ``NAME.report.json``: the same run information and the reports read back from
  the executed notebook.

Prints the notebook's output while it runs (the procedures print their
progress) and the checklist summary at the end; the exit code is 0 only when
the notebook ran to the end, recorded at least one report, and every report
passed.

Notebooks are found by name (``01``, ``01_local_multi_node`` or
``local_multi_node``) in, in order: ``$MACULA_LAB_NOTEBOOKS``; the
``notebooks/`` directory of the source checkout the package runs from
(editable installs, Binder); ``<prefix>/share/macula-lab/notebooks`` (a
pip-installed wheel ships them there); ``./notebooks``.  A path to an
``.ipynb`` file works too.
"""

from __future__ import annotations

import argparse
import copy
import html as html_escape
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import MaculaError
from .report import Report, reports_in_notebook

NOTEBOOK_ENV = "MACULA_LAB_NOTEBOOKS"
DEFAULT_OUTPUT = "procedure-runs"


class UnknownProcedure(MaculaError, LookupError):
    code = "unknown_procedure"


#: stem -> (one line on what it does, what it needs running elsewhere or None)
DESCRIPTIONS: dict[str, tuple[str, str | None]] = {
    "00_quickstart": ("a tour: three nodes in the kernel, the dashboard, diagnose, the checklist", None),
    "01_local_multi_node": ("three nodes in the kernel: expected output, the whole checklist, metrics", None),
    "02_containers": (
        "the checklist against nodes in containers",
        "nodes in containers (docker compose -f docker/compose.yaml up -d); -p endpoints, ca, admin_token",
    ),
    "03_k3s": (
        "the checklist against the nodes of a k3s StatefulSet",
        "a k3s cluster running k3s/ (kubectl apply -k k3s/); pods found by label; -p ca, admin_token",
    ),
    "04_hosts": (
        "the checklist against nodes on real hosts",
        "macula-lab node on each host; -p endpoints (or hosts), realm, ca, admin_token",
    ),
    "05_selection_and_failover": ("selection strategies compared; failover while a provider is killed", None),
    "08_load": ("open-loop load: latency without coordinated omission, saturation", None),
    "09_tuning": ("K, cache TTL and re-advertisement swept under churn in virtual time: a recommendation", None),
}


def describe_notebook(nb_path: Path) -> tuple[str, str | None]:
    """(description, needs) for ``--list``: from DESCRIPTIONS, else the notebook's first heading."""
    if nb_path.stem in DESCRIPTIONS:
        return DESCRIPTIONS[nb_path.stem]
    try:
        cells = json.loads(nb_path.read_text(encoding="utf-8")).get("cells", [])
        source = "".join(next(c["source"] for c in cells if c.get("cell_type") == "markdown"))
        return source.splitlines()[0].lstrip("# ").strip(), None
    except (OSError, ValueError, StopIteration, IndexError, KeyError, TypeError):
        return "", None


def notebook_dirs() -> list[Path]:
    import macula_lab

    dirs = []
    if os.environ.get(NOTEBOOK_ENV):
        dirs.append(Path(os.environ[NOTEBOOK_ENV]))
    dirs.append(Path(macula_lab.__file__).resolve().parent.parent / "notebooks")
    dirs.append(Path(sys.prefix) / "share" / "macula-lab" / "notebooks")
    dirs.append(Path.cwd() / "notebooks")
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def available() -> list[Path]:
    """Every procedure notebook (``NN_name.ipynb``), first directory wins for a name."""
    seen: dict[str, Path] = {}
    for d in notebook_dirs():
        for nb in sorted(d.glob("[0-9][0-9]_*.ipynb")):
            seen.setdefault(nb.stem, nb)
    return [seen[k] for k in sorted(seen)]


def find_notebook(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".ipynb" and path.is_file():
        return path
    stem = path.stem if path.suffix == ".ipynb" else name
    for nb in available():
        number, _, rest = nb.stem.partition("_")
        if stem in (nb.stem, number, rest):
            return nb
    names = ", ".join(nb.stem for nb in available()) or f"none (searched {[str(d) for d in notebook_dirs()]})"
    raise UnknownProcedure(f"no procedure notebook {name!r}; available: {names}")


def parse_value(text: str) -> Any:
    """``-p`` values: JSON when they parse (numbers, true/false/null, lists, objects), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass
class ProcedureRun:
    name: str
    notebook: Path
    executed: Path
    html: Path | None
    report_json: Path
    reports: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    wall: float = 0.0
    #: date, host, versions, git commit and parameters of the run (the report header)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.reports) and all(r.get("passed") for r in self.reports)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def summary(self) -> str:
        lines = [Report.from_dict(r).text() for r in self.reports]
        if not self.reports:
            lines.append(f"{self.name}: no report was recorded")
        if self.error:
            lines.append(f"{self.name}: the notebook failed: {self.error}")
        lines.append(
            f"{self.name}: {'PASSED' if self.passed else 'FAILED'} in {self.wall:.1f}s wall "
            f"(kernel start included); executed notebook {self.executed}"
            + (f", HTML report {self.html}" if self.html else "")
        )
        return "\n".join(lines)


def run_procedure(
    name: str,
    parameters: dict[str, Any] | None = None,
    *,
    output_dir: str | Path = DEFAULT_OUTPUT,
    kernel: str = "python3",
    timeout: float | None = 600,
    html: bool = True,
    with_input: bool = False,
    stream: TextIO | None = None,
) -> ProcedureRun:
    """Execute the notebook ``name`` with ``parameters``; see the module docstring."""
    import nbformat
    import papermill as pm

    t0 = time.perf_counter()
    notebook = find_notebook(name)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = ProcedureRun(
        notebook.stem,
        notebook,
        out / f"{notebook.stem}.ipynb",
        None,
        out / f"{notebook.stem}.report.json",
    )
    stream = stream or sys.stdout
    run.info = run_info(notebook, parameters)
    try:
        pm.execute_notebook(
            str(notebook),
            str(run.executed),
            parameters=dict(parameters or {}),
            kernel_name=kernel,
            engine_name=_progress_engine(),
            language="python",
            progress_bar=False,
            stdout_file=stream,
            stderr_file=sys.stderr,
            execution_timeout=timeout,
            # the kernel talks to us over Unix sockets, not plaintext TCP on loopback
            # (ipykernel warns about the latter on every start)
            kernel_manager_class="macula_lab.procedures.runner.IpcKernelManager",
        )
    except pm.PapermillExecutionError as exc:
        run.error = f"cell {exc.exec_count}: {exc.ename}: {exc.evalue}"
    except Exception as exc:  # kernel died, bad parameters, ...: still report what we have
        run.error = f"{type(exc).__name__}: {exc}"
    if run.executed.exists():
        nb = nbformat.read(run.executed, as_version=4)
        run.reports = reports_in_notebook(nb)
    run.wall = time.perf_counter() - t0
    if html and run.executed.exists():
        run.html = out / f"{notebook.stem}.html"
        run.html.write_text(export_html(nb, run, with_input=with_input), encoding="utf-8")
        _plotly_beside(out)
    run.report_json.write_text(
        json.dumps(
            {
                "procedure": run.name,
                "passed": run.passed,
                "error": run.error,
                "wall_s": run.wall,
                **run.info,
                "reports": run.reports,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    return run


def run_info(notebook: Path, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """What a reader of a report needs to know where it came from."""
    import macula_lab

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "version": macula_lab.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(Path(macula_lab.__file__).resolve().parent.parent),
        "notebook": str(notebook),
        "parameters": dict(parameters or {}),
    }


def _git_commit(where: Path) -> str | None:
    """The checkout's commit (``+dirty`` with local changes); None for an installed package."""
    if not (where / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


#: the plotly.js bundle that plotly's "notebook" renderer puts inline into the first figure's output
_PLOTLY_BUNDLE = re.compile(r"window\.PlotlyConfig|\* plotly\.js v")
_WIDGET = "application/vnd.jupyter.widget-view+json"


def export_html(nb: Any, run: ProcedureRun, *, with_input: bool = False) -> str:
    """The static report: header, outputs, no widget state, plotly.js once (see the module docstring)."""
    from nbconvert import HTMLExporter

    nb = copy.deepcopy(nb)
    # a live widget's state is megabytes of samples (10 MB in 00) and draws nothing without a kernel
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data") or {}
            page = data.get("text/html", "")
            page = "".join(page) if isinstance(page, list) else page
            if len(page) > 100_000 and _PLOTLY_BUNDLE.search(page[:2000]):
                continue  # loaded once in the head instead
            if _WIDGET in data:
                output["data"] = {"text/plain": "(a live widget: it needs the running kernel, not kept in the report)"}
            kept.append(output)
        cell.outputs = kept
    title = f"{run.name}: {'PASSED' if run.passed else 'FAILED'}"
    nb.cells.insert(0, _header_cell(run))
    exporter = HTMLExporter(exclude_input=not with_input, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    version = _plotly_version()
    cdn = f"https://cdn.plot.ly/plotly-{version}.min.js" if version else "https://cdn.plot.ly/plotly-latest.min.js"
    loader = (
        '<script src="plotly.min.js"></script>'
        f"<script>window.Plotly || document.write('<script src=\"{cdn}\"><\\/script>')</script>"
    )
    return body.replace("</head>", loader + "</head>", 1)


def _header_cell(run: ProcedureRun) -> Any:
    import nbformat

    info = run.info
    verdict = "PASSED" if run.passed else "FAILED"
    colour = "#1a7f37" if run.passed else "#cf222e"
    lines = [Report.from_dict(r).summary_line() for r in run.reports] or ["no report was recorded"]
    if run.error:
        lines.append(f"the notebook failed: {run.error}")
    rows = [
        ("date", info.get("date")),
        ("host", info.get("host")),
        ("macula-lab", info.get("version")),
        ("python", info.get("python")),
        ("git commit", info.get("commit") or "not a source checkout"),
        ("wall time", f"{run.wall:.1f} s (kernel start included)"),
    ] + [(f"parameter {k}", json.dumps(v)) for k, v in (info.get("parameters") or {}).items()]
    table = "".join(
        f"<tr><th style='text-align:left'>{html_escape.escape(str(k))}</th>"
        f"<td style='text-align:left'>{html_escape.escape(str(v))}</td></tr>"
        for k, v in rows
    )
    summary = "".join(f"<li>{html_escape.escape(line)}</li>" for line in lines)
    return nbformat.v4.new_markdown_cell(
        f"<h1 class='macula-report-title'>{html_escape.escape(run.name)}: "
        f"<span style='color:{colour}'>{verdict}</span></h1>\n\n"
        f"<ul class='macula-report-verdict'>{summary}</ul>\n\n"
        f"<table class='macula-report-header' style='margin-left:0'>{table}</table>\n\n"
        "(parameters not listed take the notebook's defaults)"
    )


def _plotly_version() -> str | None:
    try:
        import plotly.offline

        return plotly.offline.get_plotlyjs_version()
    except Exception:
        return None


def _plotly_beside(out: Path) -> None:
    """plotly.min.js next to the reports (once per directory): they open offline."""
    try:
        import plotly
    except ImportError:
        return
    source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    target = out / "plotly.min.js"
    if source.is_file() and (not target.exists() or target.stat().st_size != source.stat().st_size):
        shutil.copyfile(source, target)


def add_procedure_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``procedure`` on the ``macula-lab`` subcommands."""
    p = sub.add_parser(
        "procedure",
        help="run a procedure notebook (papermill): executed notebook, HTML report, checklist summary",
        # the module docstring's first paragraph, as plain text (no RST literals in a terminal)
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    p.add_argument("name", nargs="?", help="01, 01_local_multi_node, local_multi_node or a path to a .ipynb")
    p.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="a notebook parameter (VALUE parsed as JSON when it parses); repeatable",
    )
    p.add_argument(
        "-o", "--output-dir", default=DEFAULT_OUTPUT, help=f"where to write (default {DEFAULT_OUTPUT}/)"
    )
    p.add_argument("-k", "--kernel", default="python3", help="Jupyter kernel name (default python3)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-cell timeout in seconds (default 600)")
    p.add_argument("--no-html", action="store_true", help="skip the HTML report")
    p.add_argument("--with-input", action="store_true", help="show the code cells in the HTML report too")
    p.add_argument("--list", action="store_true", help="list the procedure notebooks and exit")
    return p


def procedure_main(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        for nb in available():
            what, needs = describe_notebook(nb)
            print(f"{nb.stem:<28} {what}")
            print(f"{'':<28} {'needs ' + needs if needs else 'runs in the kernel, needs nothing else'}")
        if not args.list:
            print("\nerror: name a procedure (see above)", file=sys.stderr)
        return 0 if args.list else 2
    try:
        params = {key: parse_value(value) for key, value in args.parameter}
        run = run_procedure(
            args.name,
            params,
            output_dir=args.output_dir,
            kernel=args.kernel,
            timeout=args.timeout,
            html=not args.no_html,
            with_input=args.with_input,
        )
    except UnknownProcedure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(run.summary(), flush=True)
    return run.exit_code


def _progress_engine() -> str:
    """A papermill engine that says when the kernel starts and which cell runs (``cell N/M``)."""
    from papermill.engines import NBClientEngine, papermill_engines

    name = "macula-progress"
    if name in papermill_engines._engines:
        return name

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            out = kwargs.get("stdout_file") or sys.stdout
            code = [i for i, c in enumerate(nb_man.nb.cells) if c.cell_type == "code"]
            t0 = time.perf_counter()
            start = nb_man.cell_start

            def cell_start(cell, cell_index=None, **kw):
                if cell_index in code:
                    n = code.index(cell_index) + 1
                    up = f" (kernel up after {time.perf_counter() - t0:.1f}s)" if n == 1 else ""
                    print(f"--- cell {n}/{len(code)}{up}", file=out, flush=True)
                return start(cell, cell_index, **kw)

            nb_man.cell_start = cell_start
            print(f"--- starting the {kernel_name} kernel ...", file=out, flush=True)
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register(name, ProgressEngine)
    return name


def _ipc_kernel_manager():
    from jupyter_client.manager import AsyncKernelManager

    class IpcKernelManager(AsyncKernelManager):
        """A kernel on Unix-socket transport, files in a private temp dir."""

        def __init__(self, **kw):
            kw.setdefault("transport", "ipc")
            super().__init__(**kw)
            if not getattr(self, "_ipc_dir", None):
                import tempfile

                self._ipc_dir = tempfile.mkdtemp(prefix="macula-kernel-")
                self.ip = os.path.join(self._ipc_dir, "kernel")

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if not restart:
                import shutil

                shutil.rmtree(self._ipc_dir, ignore_errors=True)

    return IpcKernelManager


def __getattr__(name: str):
    if name == "IpcKernelManager":  # built lazily: importing jupyter_client is slow
        return _ipc_kernel_manager()
    raise AttributeError(name)
