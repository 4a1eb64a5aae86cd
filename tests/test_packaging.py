"""`pip install .` gives working tools outside the checkout: the wheel holds the library, the entry-point packages
and their data files, and every console script starts from an unrelated folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, installed (without dependencies: the test environment has them) into a fresh folder."""
    tmp = tmp_path_factory.mktemp("pkg")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "wheel"), str(ROOT)], check=True)
    wheel = next((tmp / "wheel").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("toolkit/pipeline.py", "launch/train.py", "toolkit/train/ds_config.json",
                   "tune/spaces/default.yaml", "export/predict.py", "serve/app.py", "serve/cluster.yaml"):
        assert needed in names, f"{needed} is missing from {wheel.name}"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                    str(tmp / "site"), str(wheel)], check=True)
    return tmp / "site"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_runs_outside_the_checkout(script: str, installed: Path, tmp_path: Path) -> None:
    module, func = SCRIPTS[script].split(":")
    # What the generated console script does, run from a folder that is not the checkout, with only the installed
    # copy on the path (the checkout's own folders cannot be picked up from the working directory).
    code = (f"import sys, {module}; print('FROM', {module}.__file__); sys.argv[0] = {script!r}; "
            f"sys.exit({module}.{func}(['--help']))")
    env = {**os.environ, "PYTHONPATH": str(installed)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()
    assert done.stdout.startswith(f"FROM {installed}"), done.stdout[:300]


@pytest.mark.slow
def test_installed_package_fingerprints_its_own_sources(installed: Path, tmp_path: Path) -> None:
    # Stage keys hash the toolkit modules a stage reaches; an installed copy reads them next to its own files (not
    # from a checkout), and the same sources give the same fingerprints.
    from toolkit.fingerprint import stage_fingerprint

    code = ("import json, toolkit.fingerprint as f; print(json.dumps([str(f.ROOT), "
            "{s: f.stage_fingerprint(s).digest for s in ('tokens', 'dense', 'select', 'finetune')}]))")
    env = {**os.environ, "PYTHONPATH": str(installed)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    root, digests = json.loads(done.stdout)
    assert Path(root) == installed / "toolkit"
    assert digests == {s: stage_fingerprint(s).digest for s in digests}
