"""The training entry point as a user runs it: dry runs, and bad input that names the dotted key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.train import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def test_dry_run_prints_the_resolved_config_and_run_directory(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:
    assert main(["--config", DEMO, "dense.lr=1e-3", f"runtime.output_dir={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.001" in out and "num_classes" not in out  # a number, and no synthetic-only key for Fashion-MNIST
    run_line = [line for line in out.splitlines() if line.startswith("# run directory:")]
    assert run_line and Path(run_line[0].split(": ", 1)[1]).parent == tmp_path
    assert Path(run_line[0].split(": ", 1)[1]).name.startswith("demo-")
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.parametrize(("override", "key"), [
    ("dense.lrr=1e-3", "dense.lrr"),           # unknown key
    ("dense.epochs=ten", "dense.epochs"),      # wrong type
    ("qp.n_per_class=0", "qp.n_per_class"),    # impossible value
])
def test_bad_input_names_the_dotted_key(override: str, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", DEMO, override, "--dry-run"]) == 2
    assert f"'{key}'" in capsys.readouterr().err


def test_until_qp_names_its_new_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--until", "qp", "--dry-run"])
    assert done.value.code == 2 and "--until qp is now --until select" in capsys.readouterr().err


def test_script_runs_without_path_tricks() -> None:
    # As a user runs it from a checkout (the package is installed): no sys.path edits in the script itself.
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", DEMO, "--dry-run"],
                          capture_output=True, text=True, cwd=ROOT / "configs")
    assert done.returncode == 0, done.stderr
    assert "sys.path" not in (ROOT / "launch" / "train.py").read_text()
