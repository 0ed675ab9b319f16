"""binder/: a fresh virtual environment built only from binder/'s files runs the quickstart notebook.

What repo2docker does, minus the container: a new venv (no packages from this
one), ``pip install -r binder/requirements.txt``, then ``binder/postBuild`` run
from a copy of the repository's files (tracked and new, not ignored ones: what a
clone would have), then papermill executes ``notebooks/00_quickstart.ipynb`` in
``notebooks/`` as JupyterLab would, so ``macula_lab`` comes from the venv, not
from the source tree.  Installing the notebook stack from PyPI takes most of its
time: 37 s here with a warm pip cache and the same with an empty one (not
marked slow; the timeout allows for a slow index).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BINDER = REPO / "binder"
QUICKSTART = "notebooks/00_quickstart.ipynb"


def requirement_names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[\s<>=!~\[;]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_binder_files_match_the_project():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    notebook_extra = requirement_names(project["optional-dependencies"]["notebook"]) - {"testbook"}
    binder = requirement_names((BINDER / "requirements.txt").read_text().splitlines())
    assert binder == notebook_extra, "binder/requirements.txt and the notebook extra drifted apart"
    runtime = (BINDER / "runtime.txt").read_text().strip()
    assert re.fullmatch(r"python-3\.\d+", runtime)
    assert project["requires-python"] == ">=3.11" and int(runtime.split(".")[1]) >= 11
    post_build = BINDER / "postBuild"
    assert os.access(post_build, os.X_OK) and post_build.read_text().startswith("#!/bin/bash\n")
    assert 'pip install --no-cache-dir ".[notebook]"' in post_build.read_text()


def repo_files() -> list[str]:
    """What a clone has: tracked files and new ones not ignored (the lead commits both)."""
    done = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"not a git checkout: {done.stderr.strip()}")
    return [f for f in done.stdout.splitlines() if (REPO / f).is_file()]


def step(cmd: list[str], *, env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.timeout(900)
def test_fresh_venv_from_binder_files_executes_the_quickstart(tmp_path: Path):
    assert (REPO / QUICKSTART).exists(), f"{QUICKSTART} is what binder opens; it is missing"
    clone = tmp_path / "repo"
    for name in repo_files():
        target = clone / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bin_dir = env_dir / "bin"
    keep = ("HOME", "LANG", "LC_ALL", "TMPDIR", "PIP_INDEX_URL", "PIP_CACHE_DIR", "PIP_EXTRA_INDEX_URL")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        VIRTUAL_ENV=str(env_dir),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        JUPYTER_PLATFORM_DIRS="1",
    )
    python = str(bin_dir / "python")
    step([python, "-m", "pip", "install", "-q", "-r", str(clone / "binder/requirements.txt")],
         env=env, cwd=clone, timeout=600)  # fmt: skip
    step(["bash", str(clone / "binder/postBuild")], env=env, cwd=clone, timeout=300)

    where = step(
        [python, "-c", "import macula_lab; print(macula_lab.__file__)"], env=env, cwd=tmp_path, timeout=60
    )
    assert where.stdout.strip().startswith(str(env_dir)), where.stdout  # installed, not the source tree

    out = tmp_path / "quickstart-out.ipynb"
    notebook = clone / QUICKSTART
    step(
        [str(bin_dir / "papermill"), str(notebook), str(out), "-k", "python3", "--cwd", str(notebook.parent)],
        env=env,
        cwd=clone,
        timeout=300,
    )
    executed = json.loads(out.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    assert executed["metadata"]["papermill"]["exception"] in (None, False)
