"""Real multi-process runs on CPU: `deepspeed --num_gpus 2 launch/train.py` (gloo) against one process, and a
rank killed with SIGKILL mid-training followed by `--resume`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Exact comparison needs the same math on 1 and 2 ranks: no dropout (per-rank RNG streams) and no BatchNorm
# (per-rank batch statistics). With those, the global batch is split across ranks and gradients are averaged, so
# the runs agree up to float summation order.
EXACT = ["adapter.batch_norm=false", "dense.dropout=0", "probe.dropout=0", "runtime.progress=false"]
TOL = 1e-3  # max |w_1proc - w_2rank| over every fine-tuned weight, and the accuracies must be equal

pytestmark = [pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("deepspeed", path=str(BIN)) is None, reason="deepspeed CLI missing")]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _deepspeed(tmp: Path, name: str, extra: list[str], port: int) -> subprocess.Popen:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(ROOT / "launch/train.py"),
           "--config", str(ROOT / "configs/tiny.yaml"), *EXACT, f"cache.root={tmp / name / 'art'}",
           f"runtime.output_dir={tmp / name / 'runs'}", "runtime.run_name=r", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _single(tmp: Path, name: str, extra: list[str]) -> None:
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/tiny.yaml"), *EXACT,
           f"cache.root={tmp / name / 'art'}", f"runtime.output_dir={tmp / name / 'runs'}", "runtime.run_name=r",
           *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _result(tmp: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    run = tmp / name / "runs" / "r"
    return json.loads((run / "metrics.json").read_text()), load_file(str(run / "checkpoint" / "model.safetensors"))


def _assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (ma, wa), (mb, wb) = a, b
    for model in ("linear_probe", "dense", "qpm"):
        assert ma[model]["accuracy"] == pytest.approx(mb[model]["accuracy"], abs=1e-9), model
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert diff <= TOL, f"max weight difference {diff} > {TOL}"


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    proc = _deepspeed(tmp_path, "two", [], port=29611)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert "world_size=2" in out and "backend=gloo" in out
    _single(tmp_path, "one", [])
    _assert_same(_result(tmp_path, "two"), _result(tmp_path, "one"))


def test_sigkill_one_rank_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    extra = ["dense.epochs=8", "runtime.checkpoint_every=1"]
    proc = _deepspeed(tmp_path, "killed", extra, port=29612)
    resume_dirs = tmp_path / "killed" / "art" / "dense"
    deadline, victim = time.time() + 600, None
    while time.time() < deadline and proc.poll() is None:
        if any(resume_dirs.glob(".work-*/resume/latest")):  # training is under way and has checkpointed
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "launch/train.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1":
                        victim = p
                except psutil.Error:
                    continue
            if victim is not None:
                time.sleep(1.0)  # a few more steps, so the kill lands mid-training
                victim.send_signal(signal.SIGKILL)
                break
        time.sleep(0.2)
    assert victim is not None, "rank 1 was never seen training"
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the run survived the kill; nothing was tested"
    assert not (tmp_path / "killed" / "runs" / "r" / "metrics.json").exists()

    proc = _deepspeed(tmp_path, "killed", [*extra, "runtime.resume=true"], port=29613)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed at epoch" in out

    clean = _deepspeed(tmp_path, "clean", extra, port=29614)
    out, _ = clean.communicate(timeout=900)
    assert clean.returncode == 0, out[-4000:]
    _assert_same(_result(tmp_path, "killed"), _result(tmp_path, "clean"))
