"""Training a module on a split through an engine, shared by the probe, dense and fine-tune stages.

`TrainContext` is what a training stage needs from the process (device, engine factory, seed, console, resume
settings); `train_model` builds the engine, runs `fit` and keeps resumable checkpoints in a work directory until the
stage's artefact is published.
"""

from __future__ import annotations

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
from toolkit.distributed import deepspeed_requested, dist_info
from toolkit.train.engine import Engine, TorchEngine
from toolkit.train.loop import Outputs, evaluate, fit, micro_batch_size

EngineFactory = Callable[[nn.Module, TrainConfig, int, str], Engine]  # (module, cfg, total_steps, stage) -> Engine


class Split(Protocol):
    """A split the stages train on: cached tokens (`toolkit.cache.TokenStore`) or images with the backbone in the
    loop (`toolkit.cache.LiveSplit`)."""

    key: str

    def dataset(self) -> Dataset: ...


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


def work_dir(root: Path, stage: str, key: str) -> Path:
    """Where a stage keeps its resumable training checkpoints until its artefact is published."""
    return root / stage / f".work-{key}"


def drop_work_dir(root: Path, stage: str, key: str) -> None:
    if dist_info().is_main:
        shutil.rmtree(work_dir(root, stage, key), ignore_errors=True)


def train_model(model: nn.Module, train: Split, cfg: TrainConfig, ctx: TrainContext, *, name: str,
                work: Path) -> list[dict[str, float]]:
    """Train `model` in place on the train split through an engine; resumable from `work/resume`."""
    micro = micro_batch_size(cfg, grad_accum=ctx.grad_accum, key=name)
    dataset: Dataset = train.dataset()
    steps_per_epoch = -(-len(dataset) // (micro * dist_info().world_size) // ctx.grad_accum)
    engine = ctx.make_engine(model, cfg, max(1, steps_per_epoch * cfg.epochs), name)
    resume_dir = work / "resume"

    def resume(engine: Engine) -> dict[str, Any] | None:
        if not (ctx.resume and (resume_dir / "latest").is_file()):
            return None
        return engine.load(resume_dir)

    def checkpoint(engine: Engine, state: dict[str, Any]) -> None:
        engine.save(resume_dir, state)

    history = fit(engine, dataset, cfg, micro_batch=micro, seed=ctx.seed, backbone=ctx.backbone,
                  console=ctx.console, name=name, resume=resume,
                  checkpoint=checkpoint if ctx.resume or ctx.checkpoint_every else None,
                  every=ctx.checkpoint_every, on_epoch=ctx.on_epoch)
    model.float()  # bf16 engines leave bf16 parameters; evaluation and checkpoints are fp32
    return history


def split_outputs(model: nn.Module, store: Split, ctx: TrainContext) -> Outputs:
    """Logits and pooled features of `model` on a cached split."""
    return evaluate(model.to(ctx.device), store.dataset(), batch_size=ctx.eval_batch_size, device=ctx.device,
                    backbone=ctx.backbone)


def make_engine_factory(runtime: RuntimeConfig, device: torch.device, precision: str) -> EngineFactory:
    """DeepSpeed engines under the deepspeed launcher (or when asked for), plain torch engines otherwise."""
    if deepspeed_requested(runtime):
        from toolkit.train._deepspeed import DeepSpeedEngine

        return lambda module, tcfg, steps, name: DeepSpeedEngine(module=module, cfg=tcfg, runtime=runtime,
                                                                   total_steps=steps, device=device,
                                                                   precision=precision)
    return lambda module, tcfg, steps, name: TorchEngine(module=module, cfg=tcfg, total_steps=steps, device=device,
                                                         grad_accum=runtime.grad_accum, precision=precision)
