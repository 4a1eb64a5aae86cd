"""The training and evaluation loop, shared by the linear probe, the dense stage and fine-tuning.

It talks to an `Engine` (plain torch or DeepSpeed) and to batches that hold either cached tokens
(`patch`, `cls`) or images (live mode, the frozen backbone runs here under no_grad).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from toolkit.cache import TokenDataset, TokenStore
from toolkit.config import TrainConfig
from toolkit.console import Console
from toolkit.distributed import dist_info
from toolkit.model import DinoQPM, LinearProbe, SparseHead, join_tokens
from toolkit.train.engine import Engine
from toolkit.train.losses import cross_entropy, total_loss
from toolkit.train.optim import set_optimizer_mode


def _identity(batch: Any) -> Any:
    return batch


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False,
                epoch: int = 0) -> DataLoader:
    """A loader over this rank's share (DistributedSampler; one share when a single process runs).

    `batch_size` is per process and per micro-step.
    """
    info = dist_info()
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    sampler.set_epoch(epoch)
    # Token batches come pre-collated from TokenDataset.__getitems__ (one memmap read per batch).
    collate = _identity if isinstance(dataset, TokenDataset) else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last)


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside a DDP or DeepSpeed wrapper (both keep it as `.module`)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def batch_tokens(batch: dict[str, torch.Tensor], backbone: nn.Module | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch (B, P, D), cls (B, D)) from a cached batch, or from the backbone in live mode."""
    if "patch" in batch:
        return batch["patch"].to(device, non_blocking=True), batch["cls"].to(device, non_blocking=True)
    if backbone is None:
        raise ValueError("live-mode batch (images) but no backbone was given to the loop")
    with torch.no_grad():
        patch, cls = backbone.tokens(batch["image"].to(device))
    return patch.float(), cls.float()


def forward_loss(model: nn.Module, patch: torch.Tensor, cls: torch.Tensor, labels: torch.Tensor,
                 cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Loss, its logged parts and the logits of one batch, for a DinoQPM or a LinearProbe."""
    core = unwrap(model)
    if isinstance(core, LinearProbe):
        logits = model(cls)
        loss = cross_entropy(logits, labels)
        return loss, {"ce": float(loss.detach())}, logits
    assert isinstance(core, DinoQPM)
    logits, features, maps = model(join_tokens(patch, cls))
    loss, parts = total_loss(logits=logits, labels=labels, maps=maps, features=features,
                             head_weight=core.head_weight(), diversity_weight=cfg.diversity_weight,
                             l1_maps_weight=cfg.l1_maps, l1_vector_weight=cfg.l1_vector)
    return loss, parts, logits


def train_epoch(engine: Engine, loader: DataLoader, cfg: TrainConfig, *, backbone: nn.Module | None,
                console: Console, desc: str, on_step: Callable[[int], None] | None = None,
                skip_steps: int = 0) -> dict[str, float]:
    """One pass over this rank's share; metrics are averaged over all ranks.

    Args:
        skip_steps: micro-steps already done in this epoch (resume from a mid-epoch checkpoint).
        on_step: called after each micro-step with the number of micro-steps done in this epoch.
    """
    engine.module.train()
    set_optimizer_mode(engine, train=True)  # schedule-free: gradients at the interpolated point
    sums: dict[str, float] = {}
    correct = seen = 0
    for i, batch in enumerate(console.progress(loader, total=len(loader), desc=desc)):
        if i < skip_steps:
            continue
        patch, cls = batch_tokens(batch, backbone, engine.device)
        labels = batch["label"].to(engine.device)
        with torch.autocast(engine.device.type, dtype=engine.autocast_dtype or torch.float32,
                            enabled=engine.autocast_dtype is not None):
            loss, parts, logits = forward_loss(engine.module, patch, cls, labels, cfg)
        engine.backward(loss)
        engine.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        if on_step is not None:
            on_step(i + 1)
    totals = _all_reduce([*sums.values(), correct, seen])
    n = max(totals[-1], 1.0)
    out = {k: v / n for k, v in zip(sums, totals[: len(sums)])}
    out["train_accuracy"] = totals[-2] / n
    return out


def _all_reduce(values: list[float]) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


@dataclass
class Outputs:
    """Per-sample outputs of a model over a whole split, in dataset order (gathered over ranks)."""

    logits: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,)
    features: np.ndarray | None = None  # (N, F') pooled features (None for the probe)

    @property
    def accuracy(self) -> float:
        return float((self.logits.argmax(1) == self.labels).mean()) if len(self.labels) else 0.0


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device,
             backbone: nn.Module | None = None, console: Console | None = None, desc: str = "eval",
             head_inputs: bool = False) -> Outputs:
    """Logits and features of every sample; each rank does a share and all ranks get the full result.

    Args:
        head_inputs: features are what the head reads (CLS for the probe, (f - mu) / sigma for the sparse head)
            instead of the pooled features (None for the probe).
    """
    info = dist_info()
    model.eval()
    core = unwrap(model)
    indices = list(range(info.rank, len(dataset), info.world_size))  # no padding, unlike DistributedSampler
    # Subset forwards __getitems__ to TokenDataset, so a token batch is still one memmap read.
    subset = torch.utils.data.Subset(dataset, indices)
    collate = _identity if isinstance(dataset, TokenDataset) else None
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    idx_parts, logit_parts, feat_parts, label_parts = [], [], [], []
    items = console.progress(loader, total=len(loader), desc=desc) if console else loader
    for batch in items:
        patch, cls = batch_tokens(batch, backbone, device)
        if isinstance(core, LinearProbe):
            logits, feats = core(cls), (cls if head_inputs else None)
        else:
            logits, feats, _ = core(join_tokens(patch, cls))
            if head_inputs and isinstance(core.head, SparseHead):
                feats = core.head.standardise(feats)
        idx_parts.append(batch["index"].numpy())
        label_parts.append(batch["label"].numpy())
        logit_parts.append(logits.float().cpu().numpy())
        if feats is not None:
            feat_parts.append(feats.float().cpu().numpy())
    local = (np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64),
             np.concatenate(logit_parts) if logit_parts else None,
             np.concatenate(label_parts) if label_parts else None,
             np.concatenate(feat_parts) if feat_parts else None)
    parts = [local]
    if dist.is_available() and dist.is_initialized() and info.world_size > 1:
        parts = [None] * info.world_size
        dist.all_gather_object(parts, local)
    idx = np.concatenate([p[0] for p in parts])
    order = np.argsort(idx)
    logits = np.concatenate([p[1] for p in parts if p[1] is not None])[order]
    labels = np.concatenate([p[2] for p in parts if p[2] is not None])[order]
    feats = None
    if parts[0][3] is not None:
        feats = np.concatenate([p[3] for p in parts if p[3] is not None])[order]
    return Outputs(logits=logits, labels=labels, features=feats)


@torch.no_grad()
def store_maps(model: nn.Module, store: TokenStore, rows: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Feature maps of the given samples of a cached split, in the order of `rows`.

    Returns:
        (len(rows), F', h, w): the model's maps, or the raw patch tokens (F' = D) for the linear probe (which
        classifies the CLS token, so its "maps" are a comparison baseline only).
    """
    core = unwrap(model)
    core.eval()
    dev = next(core.parameters()).device
    rows = np.asarray(rows, dtype=np.int64)
    h, w = store.grid
    out = []
    for start in range(0, len(rows), batch_size):
        batch = TokenDataset(store).__getitems__(rows[start:start + batch_size].tolist())
        patch, cls = batch["patch"].to(dev), batch["cls"].to(dev)
        if isinstance(core, LinearProbe):
            out.append(patch.transpose(1, 2).reshape(len(patch), -1, h, w).cpu().numpy())
        else:
            out.append(core(join_tokens(patch, cls))[2].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0, h, w), np.float32)


def micro_batch_size(cfg: TrainConfig, *, grad_accum: int, key: str) -> int:
    """Per-process micro-batch from the global batch; the global batch must split evenly."""
    world = dist_info().world_size
    if cfg.batch_size % (world * grad_accum):
        raise ValueError(f"config key '{key}.batch_size'={cfg.batch_size} does not divide into world_size={world} x "
                         f"runtime.grad_accum={grad_accum}; pick a multiple of {world * grad_accum}")
    return cfg.batch_size // (world * grad_accum)


def fit(engine: Engine, train: Dataset, cfg: TrainConfig, *, micro_batch: int, seed: int,
        backbone: nn.Module | None, console: Console, name: str,
        resume: Callable[[Engine], dict[str, Any] | None] | None = None,
        checkpoint: Callable[[Engine, dict[str, Any]], None] | None = None,
        every: int = 0, on_epoch: Callable[[str, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train for `cfg.epochs`, optionally resuming from and writing resumable checkpoints.

    Args:
        resume: returns the client state of the last complete checkpoint (loading it into the engine), or None.
        checkpoint: writes a resumable checkpoint with the given client state.
        every: also checkpoint every this many micro-steps (0 = at epoch ends only).
        on_epoch: called on every rank after each epoch (and its checkpoint) with (name, that epoch's history
            entry); sweeps use it to report progress to a scheduler.
    """
    state = resume(engine) if resume else None
    history: list[dict[str, float]] = list(state["history"]) if state else []
    start, skip = (state["epoch"], state["step"]) if state else (0, 0)
    if state:
        console.log(f"{name}: resumed at epoch {start + 1}, step {skip}")
    for epoch in range(start, cfg.epochs):
        loader = make_loader(train, batch_size=micro_batch, shuffle=True, seed=seed, epoch=epoch)

        def on_step(step: int, epoch: int = epoch, n_steps: int = len(loader)) -> None:
            if checkpoint and every and step % every == 0 and step < n_steps:
                checkpoint(engine, {"epoch": epoch, "step": step, "history": history})

        t0 = time.perf_counter()
        metrics = train_epoch(engine, loader, cfg, backbone=backbone, console=console,
                              desc=f"{name} epoch {epoch + 1}/{cfg.epochs}", on_step=on_step,
                              skip_steps=skip if epoch == start else 0)
        metrics["seconds"] = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, **{k: round(v, 6) for k, v in metrics.items()}})
        console.log(f"{name} epoch {epoch + 1}/{cfg.epochs}: "
                    + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if checkpoint:
            checkpoint(engine, {"epoch": epoch + 1, "step": 0, "history": history})
        if on_epoch is not None:
            on_epoch(name, history[-1])
    set_optimizer_mode(engine, train=False)  # schedule-free: the model now holds the averaged weights
    return history
