"""Training that holds under several ranks: exact gradient accumulation (one process), fp32 master weights under
bf16 (DeepSpeed on CPU), and real multi-process runs on CPU (`deepspeed --num_gpus 2 launch/train.py`, gloo):
2 ranks with BatchNorm on against one process, and a rank killed at a point the test chooses followed by `--resume`
against an uninterrupted run, with the default BatchNorm and dropout."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests._net import free_port
from toolkit.config import ProbeConfig, RuntimeConfig
from toolkit.console import Console
from toolkit.distributed import set_threads, usable_cores
from toolkit.model import LinearProbe
from toolkit.train import TorchEngine, fit
from toolkit.train.loop import accumulation_group, optimizer_steps_per_epoch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# 2 ranks against one process: BatchNorm stays on (synchronised over the ranks, so both see the global batch's
# statistics). Dropout is off because its masks come from each rank's own RNG stream, which cannot reproduce the
# single process's one mask over the whole batch; that is a different random draw, not an error.
NO_DROPOUT = ["dense.dropout=0", "probe.dropout=0", "runtime.progress=false"]
# max |w_1proc - w_2rank| over the dense model's weights (the stage BatchNorm synchronisation decides), except the
# Linear biases in front of a BatchNorm and the running means that track them: BN removes any constant, so their
# gradient is zero up to rounding, and AdamW's normalised update turns that rounding noise into lr-sized steps.
# Observed: ~1e-6 for the rest. Fine-tuning then starts
# from features that differ by that noise and amplifies it (lr 2e-2), so the final model is compared by accuracy.
TOL = 1e-4  # the dense model: only the order of the all-reduce sums differs from one process
FINAL_TOL = 1e-3  # the fine-tuned model: the dense model's rounding differences, amplified by 6 more epochs
# Pre-BN biases are frozen (BatchNorm cancels them) and the running means absorb them: no training signal there.
BN_CANCELLED = re.compile(r"adapter\.blocks\.\d+\.(linear\.bias|norm\.running_mean)$")
# Kill-and-resume with the defaults (BN and dropout on), and an epoch that is not a multiple of grad_accum:
# 32 images / 2 ranks = 16 per rank, micro-batch 24 / (2 x 4) = 3 -> 6 micro-steps = groups of 4 and 2.
RESUME = ["dense.epochs=4", "dense.batch_size=24", "runtime.grad_accum=4", "runtime.checkpoint_every=1",
          "runtime.progress=false"]
PAUSE_AT = 3  # dense optimiser step 3 = epoch 2, micro-step 4 of 6: mid-epoch, mid-stage
PAUSE_ENV = "PAUSE_AFTER_CHECKPOINT"  # read by tests/_paused_train.py, the test's own entry point
TRAIN = ROOT / "launch" / "train.py"


# ------------------------------------------------------------------------------------------ one process


class _Tokens(torch.utils.data.Dataset):
    """n samples of CLS tokens (dim 6) from 3 separable classes."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.label = torch.arange(n) % 3
        self.cls = torch.randn(n, 6, generator=g) + 2 * torch.nn.functional.one_hot(self.label, 6).float()

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"patch": torch.zeros(1, 6), "cls": self.cls[i], "label": self.label[i], "index": torch.tensor(i)}


def _train(*, n: int, micro: int, grad_accum: int, epochs: int, every: int = 0,
           schedule: str = "cosine") -> tuple[LinearProbe, TorchEngine, list[dict], list[float]]:
    """A linear probe trained by `fit` through a TorchEngine; returns (model, engine, checkpoints, lr per step)."""
    torch.manual_seed(0)
    model = LinearProbe(in_dim=6, n_classes=3, dropout=0.0)
    cfg = ProbeConfig(epochs=epochs, batch_size=micro * grad_accum, lr=0.1, weight_decay=0.0, schedule=schedule)
    data = _Tokens(n)
    per_epoch = optimizer_steps_per_epoch(n, micro_batch=micro, grad_accum=grad_accum)
    engine = TorchEngine(module=model, cfg=cfg, total_steps=per_epoch * epochs, device=torch.device("cpu"),
                         grad_accum=grad_accum)
    lrs: list[float] = []  # the LR each optimiser step used
    engine.optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    saved: list[dict] = []
    fit(engine, data, cfg, micro_batch=micro, seed=0, backbone=None, console=Console(enabled=False), name="t",
        grad_accum=grad_accum, checkpoint=lambda e, state, mine: saved.append(dict(state)), every=every)
    return model, engine, saved, lrs


def test_threads_follow_the_config_then_omp_then_the_cores_per_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        for var in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
            monkeypatch.delenv(var, raising=False)
        assert set_threads(RuntimeConfig()) == usable_cores() == torch.get_num_threads()  # one process: every core
        monkeypatch.setenv("LOCAL_SIZE", str(usable_cores() * 2))  # more ranks than cores (deepspeed's variable)
        assert set_threads(RuntimeConfig()) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # set by torchrun, Ray or the user: honoured
        assert set_threads(RuntimeConfig()) == 3 == torch.get_num_threads()
        assert set_threads(RuntimeConfig(threads=2)) == 2 == torch.get_num_threads()  # the config wins
    finally:
        torch.set_num_threads(before)


def test_accumulation_groups_end_with_the_epoch() -> None:
    groups = [accumulation_group(i, 5, 2) for i in range(5)]
    assert groups == [(2, False), (2, True), (2, False), (2, True), (1, True)]
    assert [accumulation_group(i, 4, 4) for i in range(4)][-1] == (4, True)


def test_partial_last_group_is_stepped_and_exact() -> None:
    # 10 samples, micro-batch 2, grad_accum 2: 5 micro-steps = groups of 2, 2, 1 -> 3 optimiser steps per epoch.
    # The same as batches of 4, 4, 2 without accumulation: the partial group averages its own micro-batches and
    # is stepped at the epoch's end, so nothing leaks into the next epoch.
    accum, engine, _, _ = _train(n=10, micro=2, grad_accum=2, epochs=3, schedule="constant")
    plain, _, _, _ = _train(n=10, micro=4, grad_accum=1, epochs=3, schedule="constant")
    assert engine.optimizer_steps == 9
    for a, b in zip(accum.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_cosine_schedule_spans_exactly_the_optimizer_steps() -> None:
    _, engine, _, lrs = _train(n=10, micro=2, grad_accum=2, epochs=3)
    assert len(lrs) == 9 == engine.scheduler.T_max  # one LR per optimiser step, T_max = optimiser steps
    assert all(b <= a for a, b in zip(lrs, lrs[1:])), f"the LR rose again: {lrs}"
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the end of the cosine


def test_checkpoint_every_counts_optimizer_steps() -> None:
    # 3 optimiser steps per epoch over 5 micro-steps; every=2 optimiser steps: mid-epoch checkpoints at steps 2
    # (epoch 1, after micro-step 4) and 4 (epoch 2, after micro-step 2), plus one at each epoch's end.
    _, _, saved, _ = _train(n=10, micro=2, grad_accum=2, epochs=2, every=2)
    assert [(s["epoch"], s["step"], s["optimizer_step"]) for s in saved] == [(0, 4, 2), (1, 0, 3), (1, 2, 4),
                                                                            (2, 0, 6)]


@pytest.mark.slow
def test_bf16_engine_saves_fp32_master_weights() -> None:
    # DeepSpeed's CPU accelerator takes bf16, so this runs here: the engine computes with bf16 parameters, and the
    # model `train_model` leaves behind (and `save_checkpoint` writes) must be the optimiser's fp32 master copy.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "_bf16_master.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.split("BF16_REPORT ", 1)[1].splitlines()[0])
    assert report["compute_dtypes"] == ["torch.bfloat16"], report  # otherwise nothing was tested
    assert report["saved_dtypes"] == ["torch.float32"], report
    assert report["max_saved_minus_master"] == 0.0, report
    # A bf16-rounded copy stored as fp32 would make this exactly 0.
    assert report["not_bf16_representable"] > 0.5, report


# ------------------------------------------------------------------------------------------ several processes


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    # DeepSpeed JIT-compiles a small C++ op at its first start; a cache of this checkout's own keeps other
    # checkouts' builds (other compiler flags) from triggering a rebuild here.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop(PAUSE_ENV, None)
    env.update(extra)
    return env


def _args(tmp: Path, name: str, extra: list[str], script: Path = TRAIN) -> list[str]:
    return [str(script), "--config", str(ROOT / "configs/tiny.yaml"),
            f"cache.root={tmp / name / 'art'}", f"runtime.output_dir={tmp / name / 'runs'}", "runtime.run_name=r",
            *extra]


def _deepspeed(tmp: Path, name: str, extra: list[str], port: int, script: Path = TRAIN,
               **env: str) -> subprocess.Popen:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), *_args(tmp, name, extra, script)]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return out


def _single(tmp: Path, name: str, extra: list[str]) -> None:
    out = subprocess.run([sys.executable, *_args(tmp, name, extra)], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _result(tmp: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    run = tmp / name / "runs" / "r"
    return json.loads((run / "metrics.json").read_text()), load_file(str(run / "checkpoint" / "model.safetensors"))


def _max_diff(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor], skip: re.Pattern | None = None) -> float:
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if not (skip and skip.search(k)))


def _dense_weights(tmp: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(next((tmp / name / "art" / "dense").glob("[0-9a-f]*")) / "checkpoint" / "model.safetensors"))


def _compare(a: tuple[dict, dict], b: tuple[dict, dict], label: str) -> float:
    """Max weight difference; prints it with the three accuracies of each run, asserts equal accuracies."""
    (ma, wa), (mb, wb) = a, b
    diff = _max_diff(wa, wb)
    accs = {m: (ma[m]["test"]["accuracy"], mb[m]["test"]["accuracy"]) for m in ("linear_probe", "dense", "dino_qpm")}
    print(f"{label}: max weight difference {diff:.3g}; accuracies (a, b) {accs}")
    for model, (x, y) in accs.items():
        assert x == pytest.approx(y, abs=1e-9), model
    return diff


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_with_batchnorm_match_one_process(tmp_path: Path) -> None:
    out = _finish(_deepspeed(tmp_path, "two", NO_DROPOUT, port=free_port()))
    assert "world_size=2" in out and "backend=gloo" in out
    assert "engine deepspeed (ZeRO stage 0, 2 ranks, fp32), 2 synchronised BatchNorms" in out
    assert out.count("run directory:") == 1  # rank 0 alone prints
    manifest = json.loads((tmp_path / "two" / "runs" / "r" / "manifest.json").read_text())
    assert manifest["engine"] == "deepspeed (ZeRO stage 0)" and manifest["world_size"] == 2
    assert manifest["stage_engines"]["dense"].startswith("deepspeed (ZeRO stage 0, 2 ranks")
    _single(tmp_path, "one", NO_DROPOUT)
    assert json.loads((tmp_path / "one" / "runs" / "r" / "manifest.json").read_text())["engine"] == "one process"
    _matches_one_process(tmp_path, "two", "2 ranks vs 1 process (BatchNorm on)")
    # One model, one accuracy: the evaluation stage recomputed every accuracy without a mismatch warning.
    assert "differs from the pipeline's" not in out


def _matches_one_process(tmp: Path, name: str, label: str) -> None:
    """Run `name` against the one-process run "one": fine-tuned model within FINAL_TOL and equal accuracies, dense
    model within TOL (BN-cancelled parameters excluded)."""
    final = _compare(_result(tmp, name), _result(tmp, "one"), f"{label}, final")
    assert final <= FINAL_TOL, f"max weight difference of the fine-tuned model {final} > {FINAL_TOL}"
    many, one = _dense_weights(tmp, name), _dense_weights(tmp, "one")
    diff = _max_diff(many, one, BN_CANCELLED)
    print(f"{label}, dense model: max weight difference {diff:.3g} (BN-cancelled biases and running means "
          f"excluded; with them {_max_diff(many, one):.3g})")
    assert diff <= TOL, f"max dense weight difference {diff} > {TOL}"


def _rank_processes(launcher: subprocess.Popen, script: Path) -> dict[int, psutil.Process]:
    found = {}
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if str(script) in " ".join(p.cmdline()) and "RANK" in p.environ():
                found[int(p.environ()["RANK"])] = p
        except psutil.Error:
            continue
    return found


@pytest.mark.distributed
@pytest.mark.slow
def test_kill_mid_stage_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    # Both ranks stop right after the checkpoint of dense optimiser step PAUSE_AT and wait there (the test's own
    # entry point, tests/_paused_train.py, wraps the training loop; the product has no pause); the test kills rank 1
    # only then, so the kill lands at the same point on an idle and on a loaded machine. The timeout below only
    # bounds a broken run, it never decides the outcome.
    marker = tmp_path / "paused"
    paused = ROOT / "tests" / "_paused_train.py"
    proc = _deepspeed(tmp_path, "killed", RESUME, port=free_port(), script=paused,
                      **{PAUSE_ENV: f"dense:{PAUSE_AT}:{marker}"})
    deadline = time.monotonic() + 900
    while not all(Path(f"{marker}.rank{r}").is_file() for r in (0, 1)):
        assert proc.poll() is None, "the run ended before the pause: " + proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the run never reached the pause"
        time.sleep(0.5)
    ranks = _rank_processes(proc, paused)
    ranks[1].send_signal(signal.SIGKILL)
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # the launcher did not take the others down: end them ourselves
        for p in ranks.values():
            if p.is_running():
                p.kill()
        proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not (tmp_path / "killed" / "runs" / "r" / "metrics.json").exists()
    resume_dir = next((tmp_path / "killed" / "art" / "dense").glob(".work-*/resume"))
    assert (resume_dir / "latest").read_text().strip() == "epoch1-step4"  # epoch 2, 4 micro-steps = step 3

    out = _finish(_deepspeed(tmp_path, "killed", [*RESUME, "runtime.resume=true"], port=free_port()))
    assert "dense: resumed at epoch 2, micro-step 4" in out
    assert not list((tmp_path / "killed" / "art").glob("*/.tmp-*")), "the killed run left a temp folder"
    assert not list((tmp_path / "killed" / "art").glob("*/.work-*")), "resume checkpoints were not cleaned up"
    _finish(_deepspeed(tmp_path, "clean", RESUME, port=free_port()))
    diff = _compare(_result(tmp_path, "killed"), _result(tmp_path, "clean"), "killed + resumed vs uninterrupted")
    assert diff == 0.0, f"resume is not exact: max weight difference {diff}"
    hist = [json.loads((d / "history.json").read_text()) for d in
            (next((tmp_path / n / "art" / "dense").glob("[0-9a-f]*")) for n in ("killed", "clean"))]
    assert [h["loss"] for h in hist[0]] == [h["loss"] for h in hist[1]]
