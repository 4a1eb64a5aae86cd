"""Training a module on a split through an engine, shared by the probe, dense and fine-tune stages.

`TrainContext` is what a training stage needs from the process (device, engine factory, seed, console, resume
settings); `train_model` builds the engine, runs `fit` and keeps resumable checkpoints in a work directory until the
stage's artefact is published.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from toolkit.config import RuntimeConfig, TrainConfig
from toolkit.console import Console
from toolkit.distributed import (
    barrier,
    broadcast_module,
    convert_sync_batchnorm,
    deepspeed_requested,
    dist_info,
    revert_sync_batchnorm,
    rng_state,
)
from toolkit.files import atomic_write_bytes
from toolkit.train import preempt
from toolkit.train.engine import Engine, TorchEngine
from toolkit.train.loop import (
    DivergedError,
    Outputs,
    evaluate,
    fit,
    micro_batch_size,
    optimizer_steps_per_epoch,
    reads_patches,
)

EngineFactory = Callable[[nn.Module, TrainConfig, int, str], Engine]  # (module, cfg, total_steps, stage) -> Engine


class Split(Protocol):
    """A split the stages train on: cached tokens (`toolkit.cache.TokenStore`) or images with the backbone in the
    loop (`toolkit.cache.LiveSplit`)."""

    key: str

    def dataset(self, *, patch: bool = True) -> Dataset: ...


@dataclass(frozen=True)
class TrainContext:
    """What a training stage needs from the process: device, engines, seeds and logging."""

    console: Console
    device: torch.device
    seed: int
    grad_accum: int
    make_engine: EngineFactory
    checkpoint_every: int = 0
    resume: bool = False
    eval_batch_size: int = 64
    backbone: nn.Module | None = None  # live mode only: the frozen backbone that turns images into tokens
    on_epoch: Callable[[str, dict[str, float]], None] | None = None  # (stage, epoch metrics) after each epoch
    on_engine: Callable[[str, str], None] | None = None  # (stage, engine description) when a stage's engine starts
    loader_options: dict[str, Any] | None = None  # DataLoader workers / pinned memory for image batches (live mode)


def work_dir(root: Path, stage: str, key: str) -> Path:
    """Where a stage keeps its resumable training checkpoints until its artefact is published."""
    return root / stage / f".work-{key}"


def drop_work_dir(root: Path, stage: str, key: str) -> None:
    if dist_info().is_main:
        shutil.rmtree(work_dir(root, stage, key), ignore_errors=True)


def diverged_message(name: str, what: str, saved: dict[str, Any] | None, resume_dir: Path) -> str:
    """What a diverged stage says: where it stopped, the last good checkpoint (its state's epoch and micro-step,
    0-based epoch), and how to go on."""
    if saved is None:
        where = "No checkpoint was written before it (runtime.checkpoint_every=N keeps one every N optimiser steps)"
    else:
        at = (f"epoch {saved['epoch'] + 1}, micro-step {saved['step']}" if saved["step"] else
              f"after epoch {saved['epoch']}")
        where = (f"The last good checkpoint is {resume_dir} (saved at {at}); `--resume` continues from it, but with "
                 "the same config it repeats the same steps (training is seeded)")
    return (f"stage '{name}' diverged at {what}; stopped on every rank before training on it. {where}. Lower "
            f"{name}.lr (e.g. 10x) and rerun with --resume: the token cache and the earlier stages are reused, and "
            f"stage '{name}' starts again from them with the new learning rate")


def train_model(model: nn.Module, train: Split, cfg: TrainConfig, ctx: TrainContext, *, name: str,
                work: Path, val: Split | None = None) -> list[dict[str, float]]:
    """Train `model` in place on the train split through an engine; resumable from `work/resume`.

    With `val` (the validation rows), every epoch's history entry also holds `val_accuracy`.

    Under several ranks the BatchNorms pool their statistics over all ranks while training (`SyncBatchNorm1d`), so
    N ranks train the model one process would. Afterwards `model` holds the engine's fp32 master weights (not the
    bf16 copy a bf16 engine computed with), identical on every rank.
    """
    micro = micro_batch_size(cfg, grad_accum=ctx.grad_accum, key=name)
    patch = reads_patches(model)  # a probe's batches leave the patch tokens out
    dataset: Dataset = train.dataset(patch=patch)
    total = optimizer_steps_per_epoch(len(dataset), micro_batch=micro, grad_accum=ctx.grad_accum) * cfg.epochs
    synced = convert_sync_batchnorm(model)
    engine = ctx.make_engine(model, cfg, max(1, total), name)
    if ctx.on_engine is not None:
        ctx.on_engine(name, engine.describe() + (f", {synced} synchronised BatchNorms" if synced else ""))
    resume_dir = work / "resume"
    rank = dist_info().rank

    def rank_file(state: dict[str, Any]) -> Path:
        return resume_dir / "rank-state" / f"epoch{state['epoch']}-step{state['step']}.rank{rank}.pkl"

    saved: list[dict[str, Any] | None] = [None]  # the last complete checkpoint's state, for a divergence message

    def resume(engine: Engine) -> dict[str, Any] | None:
        if not (ctx.resume and (resume_dir / "latest").is_file()):
            return None
        state = engine.load(resume_dir)
        saved[0] = state
        own = rank_file(state)
        if not own.is_file():
            raise FileNotFoundError(f"{own} is missing: the checkpoint in {resume_dir} is incomplete; delete that "
                                    "folder to restart the stage from scratch")
        mine = pickle.loads(own.read_bytes())  # our own file, written by `checkpoint` below
        return {**state, "partial": mine.get("partial"), "rng": mine["rng"]}

    written: list[Path] = []  # the last checkpoint's rank file: a preemption at that step writes nothing new

    def checkpoint(engine: Engine, state: dict[str, Any], mine: dict[str, Any]) -> None:
        # This rank's RNG streams and partial metric sums first; the engine's `latest` pointer (written after a
        # barrier inside `save`) then only ever names a checkpoint whose rank files are complete.
        path = rank_file(state)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, pickle.dumps({**mine, "rng": rng_state()}))
        barrier()
        engine.save(resume_dir, state)
        saved[0] = state
        for old in path.parent.glob(f"*.rank{rank}.pkl"):
            if old != path:
                old.unlink(missing_ok=True)
        written[:] = [path]

    def stop(engine: Engine, state: dict[str, Any], mine: dict[str, Any]) -> None:
        if not preempt.agreed(engine.device):  # one all-reduce: every rank stops at the same step
            return
        if written != [rank_file(state)]:
            checkpoint(engine, state, mine)
        message = (f"{name}: preempted ({preempt.signalled() or 'signal on another rank'}); stopped after epoch "
                   f"{state['epoch'] + 1}, micro-step {state['step']} (optimiser step {state['optimizer_step']}), "
                   f"resume checkpoint in {resume_dir}, {preempt.seconds_since_signal():.1f} s after the signal; "
                   "rerun with --resume to continue")
        ctx.console.log(message)
        raise preempt.Preempted(message)

    try:
        history = fit(engine, dataset, cfg, micro_batch=micro, seed=ctx.seed, backbone=ctx.backbone,
                      console=ctx.console, name=name, grad_accum=ctx.grad_accum, resume=resume,
                      checkpoint=checkpoint if ctx.resume or ctx.checkpoint_every else None,
                      every=ctx.checkpoint_every, on_epoch=ctx.on_epoch, loader_options=ctx.loader_options,
                      val=val.dataset(patch=patch) if val is not None else None,
                      stop=stop if preempt.installed() else None)
        master = engine.master_state_dict()
    except DivergedError as e:
        raise DivergedError(diverged_message(name, str(e), saved[0], resume_dir)) from None
    finally:
        revert_sync_batchnorm(model)
    model.float()  # a bf16 engine cast the parameters; the master weights below replace their values
    model.load_state_dict(master)
    broadcast_module(model)  # one model on every rank, whatever the engine did with buffers
    return history


def split_outputs(model: nn.Module, store: Split, ctx: TrainContext) -> Outputs:
    """Logits and pooled features of `model` on a cached split."""
    return evaluate(model.to(ctx.device), store.dataset(patch=reads_patches(model)), batch_size=ctx.eval_batch_size,
                    device=ctx.device, backbone=ctx.backbone)


def scores(model: nn.Module, val: Split | None, test: Split, ctx: TrainContext) -> dict[str, float | None]:
    """{"val_accuracy": ... (None when nothing is held out), "test_accuracy": ...} of `model`."""
    return {"val_accuracy": split_outputs(model, val, ctx).accuracy if val is not None else None,
            "test_accuracy": split_outputs(model, test, ctx).accuracy}


def split_keys(train: Split, val: Split | None, test: Split) -> dict[str, str]:
    """What a training stage hashes of its splits: the fit rows, the validation rows (when held out) and test."""
    return {"train": train.key, **({"val": val.key} if val is not None else {}), "test": test.key}


def make_engine_factory(runtime: RuntimeConfig, device: torch.device, precision: str) -> EngineFactory:
    """DeepSpeed engines under the deepspeed launcher (or when asked for), plain torch engines otherwise."""
    if deepspeed_requested(runtime):
        from toolkit.train._deepspeed import DeepSpeedEngine

        return lambda module, tcfg, steps, name: DeepSpeedEngine(module=module, cfg=tcfg, runtime=runtime,
                                                                   total_steps=steps, device=device,
                                                                   precision=precision)
    return lambda module, tcfg, steps, name: TorchEngine(module=module, cfg=tcfg, total_steps=steps, device=device,
                                                         grad_accum=runtime.grad_accum, precision=precision)
