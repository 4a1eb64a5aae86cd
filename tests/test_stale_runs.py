"""A run directory held by a live job refuses a second job; one left by a killed job is taken over (toolkit.runlock).

Real processes on one pinned run name: job A stops for good right after a dense checkpoint (tests/_paused_train.py
writes a marker file, the test waits for it), job B is refused while A lives, A is killed with SIGKILL, and job C
takes the directory over, says so, and resumes A's training to the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit.runlock import LOCK

ROOT = Path(__file__).resolve().parents[1]
PAUSED = ROOT / "tests" / "_paused_train.py"


def _cmd(tmp: Path, script: Path, *extra: str) -> list[str]:
    return [sys.executable, str(script), "--config", str(ROOT / "configs" / "tiny.yaml"), "--until", "dense",
            f"cache.root={tmp / 'art'}", f"runtime.output_dir={tmp / 'runs'}", "runtime.run_name=pinned",
            "runtime.progress=false", "runtime.checkpoint_every=1", "probe_dinov2.enabled=false", "dense.epochs=2",
            *extra]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("PAUSE_AFTER_CHECKPOINT", None)
    return {**env, **extra}


@pytest.mark.distributed
@pytest.mark.slow
def test_live_job_refuses_a_second_one_killed_job_is_taken_over(tmp_path: Path) -> None:
    marker = tmp_path / "paused"
    out = (tmp_path / "a.out").open("w")
    a = subprocess.Popen(_cmd(tmp_path, PAUSED), cwd=ROOT, env=_env(PAUSE_AFTER_CHECKPOINT=f"dense:2:{marker}"),
                         stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 900  # a hang guard only
    try:
        while not Path(f"{marker}.rank0").is_file():  # A holds the directory and sits after dense step 2
            assert a.poll() is None, "job A ended before its pause: " + (tmp_path / "a.out").read_text()[-4000:]
            assert time.monotonic() < deadline, "job A never reached its pause"
            time.sleep(0.2)
        run_dir = tmp_path / "runs" / "pinned"
        owner = json.loads((run_dir / LOCK).read_text())
        assert owner["pid"] == a.pid

        b = subprocess.run(_cmd(tmp_path, ROOT / "launch" / "train.py"), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=600)
        assert b.returncode == 2, b.stdout[-2000:] + b.stderr[-2000:]
        assert f"is in use by a running job (pid {a.pid} on host " in b.stderr and f"kill {a.pid}" in b.stderr
        assert json.loads((run_dir / LOCK).read_text())["pid"] == a.pid  # B changed nothing
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(timeout=120)
        out.close()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == a.pid  # what a killed job leaves

    c = subprocess.run([*_cmd(tmp_path, ROOT / "launch" / "train.py"), "--resume"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-3000:]
    log = (run_dir / "log.txt").read_text()
    assert f"was left by a job that did not finish (pid {a.pid} on host " in log
    assert f"pid {a.pid} is not running): taking it over" in log
    assert "dense: resumed at epoch 1, micro-step 2" in log  # A's training continues, not restarts
    assert (run_dir / LOCK).read_text() == ""  # a clean end
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["dense"]["cached"] is False
