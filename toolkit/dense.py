"""Stages that train on the token cache: the dense DINO-QPM model and the linear-probe baseline.

dense: Split(train, test) -> DenseResult (adapter + dense head, pooled train features, per-feature mean/std).
probe: Split(train, test) -> a linear classifier on the frozen CLS token (dino_qpm.md §2.6), the baseline.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from toolkit.artifacts import content_key, get_or_run, write_json
from toolkit.cache import LiveSplit, TokenStore
from toolkit.checkpoint import load_checkpoint, save_checkpoint
from toolkit.config import AdapterConfig, DenseConfig, ProbeConfig, TrainConfig, to_dict
from toolkit.loop import Outputs, evaluate, fit, micro_batch_size
from toolkit.model import DinoQPM, LinearProbe, build_dense_model
from toolkit.runtime import Console, Engine, dist_info, seed_everything

Split = TokenStore | LiveSplit  # cached tokens, or images with the backbone in the loop (cache.mode=live)
EngineFactory = Callable[[nn.Module, TrainConfig, int, str], Engine]  # (module, cfg, total_steps, stage) -> Engine


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


@dataclass(frozen=True)
class DenseResult:
    directory: Path
    key: str
    metrics: dict[str, Any]

    def model(self) -> DinoQPM:
        model, _ = load_checkpoint(self.directory / "checkpoint")
        assert isinstance(model, DinoQPM)
        return model

    @property
    def train_features(self) -> np.ndarray:
        """(N, F) pooled dense features of the train split (eval mode, no dropout)."""
        return np.load(self.directory / "train_features.npy")

    @property
    def train_labels(self) -> np.ndarray:
        return np.load(self.directory / "train_labels.npy")

    @property
    def mean(self) -> np.ndarray:
        return np.load(self.directory / "mean.npy")

    @property
    def std(self) -> np.ndarray:
        return np.load(self.directory / "std.npy")


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


def run_dense(*, train: Split, test: Split, adapter: AdapterConfig, cfg: DenseConfig, ctx: TrainContext,
              root: Path, meta: dict[str, Any]) -> DenseResult:
    """Train the dense model (adapter + dense head, CE + feature-diversity loss) and pool its train features."""
    key = content_key("dense", {"adapter": to_dict(adapter), "dense": to_dict(cfg), "seed": ctx.seed},
                      {"train": train.key, "test": test.key})

    def build(tmp: Path) -> dict[str, Any]:
        seed_everything(ctx.seed)
        model = build_dense_model(adapter, in_dim=train.meta["embed_dim"], n_classes=len(train.classes),
                                  dropout=cfg.dropout, grid=train.grid)
        history = train_model(model, train, cfg, ctx, name="dense", work=work_dir(root, "dense", key))
        model = model.to(ctx.device)
        tr = evaluate(model, train.dataset(), batch_size=ctx.eval_batch_size, device=ctx.device,
                      backbone=ctx.backbone, console=ctx.console, desc="dense features (train)")
        te = evaluate(model, test.dataset(), batch_size=ctx.eval_batch_size, device=ctx.device,
                      backbone=ctx.backbone, console=ctx.console, desc="dense eval (test)")
        assert tr.features is not None
        if not dist_info().is_main:  # every rank trained and evaluated; rank 0 alone writes
            return {}
        np.save(tmp / "train_features.npy", tr.features.astype(np.float32))
        np.save(tmp / "train_labels.npy", tr.labels)
        # Population statistics over the train set, in eval mode (dino_qpm.md §1.8); frozen in the sparse head.
        np.save(tmp / "mean.npy", tr.features.mean(0).astype(np.float32))
        np.save(tmp / "std.npy", tr.features.std(0).astype(np.float32))
        save_checkpoint(tmp / "checkpoint", model, kind="dense", adapter=adapter, embed_dim=train.meta["embed_dim"],
                        n_classes=len(train.classes), grid=train.grid, meta=meta)
        write_json(tmp / "history.json", history)
        return {"train_accuracy": tr.accuracy, "accuracy": te.accuracy}

    directory, manifest, _ = get_or_run(root, "dense", key, build, config={"adapter": to_dict(adapter),
                                        "dense": to_dict(cfg)}, upstream={"train": train.key, "test": test.key},
                                        log=ctx.console.log)
    drop_work_dir(root, "dense", key)
    return DenseResult(directory, key, manifest.metrics)


def run_probe(*, train: Split, test: Split, cfg: ProbeConfig, ctx: TrainContext, root: Path,
              meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Train the linear probe on the frozen CLS token of the same cache; returns (directory, metrics)."""
    key = content_key("probe", {"probe": to_dict(cfg), "seed": ctx.seed}, {"train": train.key, "test": test.key})

    def build(tmp: Path) -> dict[str, Any]:
        seed_everything(ctx.seed)
        d = train.meta["embed_dim"]
        model = LinearProbe(in_dim=d, n_classes=len(train.classes), dropout=cfg.dropout)
        history = train_model(model, train, cfg, ctx, name="probe", work=work_dir(root, "probe", key))
        te = evaluate(model.to(ctx.device), test.dataset(), batch_size=ctx.eval_batch_size, device=ctx.device,
                      backbone=ctx.backbone)
        if not dist_info().is_main:
            return {}
        save_checkpoint(tmp / "checkpoint", model, kind="probe", adapter=None, embed_dim=d,
                        n_classes=len(train.classes), grid=train.grid, meta=meta)
        write_json(tmp / "history.json", history)
        return {"accuracy": te.accuracy, "train_accuracy": history[-1]["train_accuracy"] if history else 0.0}

    directory, manifest, _ = get_or_run(root, "probe", key, build, config={"probe": to_dict(cfg)},
                                        upstream={"train": train.key, "test": test.key}, log=ctx.console.log)
    drop_work_dir(root, "probe", key)
    return directory, manifest.metrics


def test_outputs(model: nn.Module, store: Split, ctx: TrainContext) -> Outputs:
    """Logits and pooled features of `model` on a cached split."""
    return evaluate(model.to(ctx.device), store.dataset(), batch_size=ctx.eval_batch_size, device=ctx.device,
                    backbone=ctx.backbone)
