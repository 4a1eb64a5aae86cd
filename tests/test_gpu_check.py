"""benchmarks/gpu_check.py: its CPU smoke mode runs every section end to end at tiny size and prints the one table
(the GPU figures themselves need a GPU node)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_a_gpu_it_refuses_and_names_the_smoke_mode() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert out.returncode == 2 and "--cpu-smoke" in out.stderr


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--work",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
    text = out.stdout
    assert out.returncode == 0, text[-4000:] + out.stderr[-2000:]
    assert "# done: 5 of 5 sections ran" in text
    # One table holds every figure; the gpu tests ran through pytest and skipped, naming CUDA.
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == "| section | measure | value |" and len(rows) > 20
    gpu_rows = [r for r in rows if r.startswith("| 1. gpu tests | test_")]
    assert len(gpu_rows) == 4 and all("skipped: needs a CUDA device" in r for r in gpu_rows), gpu_rows
    assert re.search(r"\| 2\. token extraction \| bf16 / fp32 \| [\d.]+x \|", text)
    assert re.search(r"\| 3\. adapter step \| achieved \| [\d.]+ TFLOP/s \|", text)
    assert re.search(r"\| 4\. full run \| accuracy \(validation / test\) \| linear_probe [\d.]+ / [\d.]+, "
                     r"dense [\d.]+ / [\d.]+, dino_qpm [\d.]+ / [\d.]+ \|", text)
    for precision in ("fp32", "fp16"):
        for batch in (1, 2):
            assert re.search(rf"\| 5\. ONNX Runtime vs torch \| {precision} batch {batch} \| torch [\d.]+ ms, ORT "
                             rf"[\d.]+ ms, torch/ORT [\d.]+x \|", text), (precision, batch)
