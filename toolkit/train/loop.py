"""The training and evaluation loop, shared by the linear probe, the dense stage and fine-tuning.

It talks to an `Engine` (plain torch or DeepSpeed) and to batches that hold either cached tokens
(`patch`, `cls`) or images (live mode, the frozen backbone runs here under no_grad).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from toolkit.cache import StoreRows, TokenDataset, TokenStore
from toolkit.config import TrainConfig
from toolkit.console import Console
from toolkit.distributed import DistInfo, dist_info, set_rng_state
from toolkit.model import DinoQPM, LinearProbe, SparseHead, join_tokens
from toolkit.train.engine import Engine
from toolkit.train.losses import cross_entropy, total_loss
from toolkit.train.optim import set_optimizer_mode


def _identity(batch: Any) -> Any:
    return batch


class DivergedError(RuntimeError):
    """The loss or the weights became non-finite (NaN/inf): the stage stopped on every rank at the same step."""


def all_finite(loss: torch.Tensor, module: nn.Module, *, stepped: bool) -> bool:
    """Whether the loss, and after an optimiser step the trainable weights, are finite on every rank.

    One all-reduce of one number per micro-step (MIN over ranks), so all ranks stop at the same step and none waits
    in a collective for a rank that stopped. A non-finite gradient shows in the weights right after the step that
    applied it, before any checkpoint of that step is written.
    """
    ok = torch.isfinite(loss.detach()).all()
    if stepped:
        params = [p.detach() for p in module.parameters() if p.requires_grad and p.numel()]
        if params:
            ok = ok & torch.stack([torch.isfinite(p).all() for p in params]).all()
    flag = ok.to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


class ResumableSampler(DistributedSampler):
    """This rank's share of a shuffled epoch (DistributedSampler), optionally from sample `start` on.

    The order depends only on (seed, epoch), and skipping happens in the sampler, so a run resumed mid-epoch sees
    exactly the batches the uninterrupted run saw next, without loading (decoding) the skipped ones.
    """

    def __init__(self, dataset: Dataset, *, shuffle: bool, seed: int, drop_last: bool = False) -> None:
        info = dist_info()
        super().__init__(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False,
                epoch: int = 0, loader_options: dict[str, Any] | None = None) -> DataLoader:
    """A loader over this rank's share (DistributedSampler; one share when a single process runs).

    `batch_size` is per process and per micro-step. `loader_options` (num_workers, pin_memory, persistent_workers)
    apply to image datasets (live mode); token batches are one memory-map read and stay in the main process.
    Without workers, each `iter(loader)` draws its base seed from the global torch RNG, as it always did (so
    single-process numbers are those of earlier versions; `fit` restores a resumed RNG after that draw); with
    workers the loader has its own generator, because persistent workers draw only once per stage.
    """
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    sampler.set_epoch(epoch)
    # Token batches come pre-collated from TokenDataset.__getitems__ (one memmap read per batch).
    tokens = isinstance(dataset, TokenDataset)
    options = {} if tokens else dict(loader_options or {})
    if not options.get("num_workers"):
        options.pop("persistent_workers", None)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=_identity if tokens else None,
                      drop_last=drop_last, generator=torch.Generator().manual_seed(seed) if options.get("num_workers")
                      else None, **options)


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside a DDP or DeepSpeed wrapper (both keep it as `.module`)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def reads_patches(model: nn.Module) -> bool:
    """Whether `model` needs the patch tokens (a DinoQPM) or the CLS tokens alone (a LinearProbe): what to ask of
    a split's `dataset(patch=...)`."""
    return not isinstance(unwrap(model), LinearProbe)


def batch_tokens(batch: dict[str, torch.Tensor], backbone: nn.Module | None,
                 device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(patch (B, P, D), cls (B, D)) from a cached batch, or from the backbone in live mode; patch is None for a
    cached batch read without patch tokens (`TokenDataset(patch=False)`)."""
    if "cls" in batch:
        patch = batch.get("patch")
        return (None if patch is None else patch.to(device, non_blocking=True),
                batch["cls"].to(device, non_blocking=True))
    if backbone is None:
        raise ValueError("live-mode batch (images) but no backbone was given to the loop")
    with torch.no_grad():
        patch, cls = backbone.tokens(batch["image"].to(device))
    return patch.float(), cls.float()


def _patches(patch: torch.Tensor | None) -> torch.Tensor:
    """The patch tokens a DinoQPM reads; None means its split was opened without them (a caller's mistake)."""
    assert patch is not None, "a DinoQPM reads patch tokens: open the split with dataset(patch=True)"
    return patch


def forward_loss(model: nn.Module, patch: torch.Tensor | None, cls: torch.Tensor, labels: torch.Tensor,
                 cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Loss, its logged parts and the logits of one batch, for a DinoQPM or a LinearProbe."""
    core = unwrap(model)
    if isinstance(core, LinearProbe):
        logits = model(cls)
        loss = cross_entropy(logits, labels)
        return loss, {"ce": float(loss.detach())}, logits
    assert isinstance(core, DinoQPM)
    logits, features, maps = model(join_tokens(_patches(patch), cls))
    loss, parts = total_loss(logits=logits, labels=labels, maps=maps, features=features,
                             head_weight=core.head_weight(), diversity_weight=cfg.diversity_weight,
                             l1_maps_weight=cfg.l1_maps, l1_vector_weight=cfg.l1_vector)
    return loss, parts, logits


def accumulation_group(i: int, n_micro: int, grad_accum: int) -> tuple[int, bool]:
    """(micro-steps in the group of micro-step i, whether i ends its group) for an epoch of n_micro micro-steps.

    Groups are [0, g), [g, 2g), ...; the last one may be shorter and is stepped at the epoch's end, so nothing
    carries over into the next epoch and an epoch has ceil(n_micro / g) optimiser steps.
    """
    full = (n_micro // grad_accum) * grad_accum
    group = grad_accum if i < full else n_micro - full
    return group, (i + 1) % grad_accum == 0 or i + 1 == n_micro


def optimizer_steps_per_epoch(n_samples: int, *, micro_batch: int, grad_accum: int) -> int:
    """ceil(micro-steps / grad_accum), micro-steps = ceil(this rank's share / micro_batch) (DistributedSampler pads
    the shares to equal length, so every rank has the same count)."""
    per_rank = -(-n_samples // dist_info().world_size)
    n_micro = -(-per_rank // micro_batch)
    return -(-n_micro // grad_accum)


def train_epoch(engine: Engine, loader: DataLoader, cfg: TrainConfig, *, backbone: nn.Module | None,
                console: Console, desc: str, grad_accum: int = 1, start: int = 0,
                on_step: Callable[[int, bool, dict[str, float]], None] | None = None,
                partial: dict[str, float] | None = None,
                after_iter: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass over this rank's share; metrics are averaged over all ranks.

    A non-finite loss, or non-finite weights after an optimiser step, raise `DivergedError` on every rank in the
    micro-step they appear in (`all_finite`), before `on_step` could checkpoint them.

    Args:
        grad_accum: micro-steps per optimiser step (the epoch's last group may be shorter, see
            `accumulation_group`).
        start: micro-steps of this epoch already done (the loader's sampler starts after them).
        on_step: called after each micro-step with (micro-steps done in this epoch, whether the optimiser stepped,
            this rank's running metric sums).
        partial: this rank's metric sums of the micro-steps before `start` (resume), so the epoch's metrics are
            those of the uninterrupted epoch.
        after_iter: called once the loader's iterator exists (a mid-epoch resume restores the RNG streams there).
    """
    engine.module.train()
    set_optimizer_mode(engine, train=True)  # schedule-free: gradients at the interpolated point
    sums: dict[str, float] = dict(partial or {})
    n_micro = start + len(loader)
    batches = iter(loader)  # may draw the loader's base seed from the global RNG
    if after_iter is not None:
        after_iter()
    for j, batch in enumerate(console.progress(batches, total=len(loader), desc=desc)):
        i = start + j
        group, boundary = accumulation_group(i, n_micro, grad_accum)
        patch, cls = batch_tokens(batch, backbone, engine.device)
        labels = batch["label"].to(engine.device, non_blocking=True)
        with torch.autocast(engine.device.type, dtype=engine.autocast_dtype or torch.float32,
                            enabled=engine.autocast_dtype is not None):
            loss, parts, logits = forward_loss(engine.module, patch, cls, labels, cfg)
        engine.backward(loss, group=group, boundary=boundary)
        engine.step()
        if not all_finite(loss, engine.module, stepped=boundary):  # stop before training on it, on every rank
            bad_loss = not bool(torch.isfinite(loss.detach()).all())
            raise DivergedError(f"{desc}, micro-step {i + 1}: the " + ("loss became non-finite" if bad_loss else
                                "weights became non-finite after the optimiser step (a non-finite gradient)")
                                + f" (loss {float(loss.detach()):.4g} on this rank)")
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * len(labels)
        sums["_correct"] = sums.get("_correct", 0.0) + int((logits.argmax(1) == labels).sum())
        sums["_seen"] = sums.get("_seen", 0.0) + len(labels)
        if on_step is not None:
            on_step(i + 1, boundary, sums)
    names = [k for k in sums if not k.startswith("_")]
    totals = _all_reduce([*(sums[k] for k in names), sums.get("_correct", 0.0), sums.get("_seen", 0.0)])
    n = max(totals[-1], 1.0)
    out = {k: v / n for k, v in zip(names, totals[: len(names)])}
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


# True while one rank evaluates on its own (the evaluation stage runs on rank 0 only): `evaluate` then covers the
# whole split in this process instead of its share, and waits for no other rank.
_LOCAL_EVALUATION: ContextVar[bool] = ContextVar("_LOCAL_EVALUATION", default=False)


@contextmanager
def local_evaluation() -> Iterator[None]:
    """Within this block `evaluate` runs over the whole split in this process (no collectives)."""
    token = _LOCAL_EVALUATION.set(True)
    try:
        yield
    finally:
        _LOCAL_EVALUATION.reset(token)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device,
             backbone: nn.Module | None = None, console: Console | None = None, desc: str = "eval",
             head_inputs: bool = False) -> Outputs:
    """Logits and features of every sample; each rank does a share and all ranks get the full result.

    Args:
        head_inputs: features are what the head reads (CLS for the probe, (f - mu) / sigma for the sparse head)
            instead of the pooled features (None for the probe).
    """
    info = dist_info() if not _LOCAL_EVALUATION.get() else DistInfo()
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
            logits, feats, _ = core(join_tokens(_patches(patch), cls))
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
def store_maps(model: nn.Module, store: TokenStore | StoreRows, rows: np.ndarray, *,
               batch_size: int = 256) -> np.ndarray:
    """Feature maps of the given samples of a cached split, in the order of `rows`.

    Returns:
        (len(rows), F', h, w): the model's maps, or the raw patch tokens (F' = D) for the linear probe (which
        classifies the CLS token, so its "maps" are a comparison baseline only).
    """
    core = unwrap(model)
    core.eval()
    dev = next(core.parameters()).device
    rows = np.asarray(rows, dtype=np.int64)
    data = store.dataset()  # a TokenDataset, over the store's rows or a view's (validation rows)
    h, w = store.grid
    out = []
    for start in range(0, len(rows), batch_size):
        batch = data.__getitems__(rows[start:start + batch_size].tolist())
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


def _val_accuracy(engine: Engine, val: Dataset, *, batch_size: int, backbone: nn.Module | None) -> float:
    """Accuracy of the model being trained on the validation rows (the weights it would be evaluated with)."""
    set_optimizer_mode(engine, train=False)  # schedule-free: score the averaged weights; train_epoch switches back
    with torch.autocast(engine.device.type, dtype=engine.autocast_dtype or torch.float32,
                        enabled=engine.autocast_dtype is not None):
        return evaluate(engine.module, val, batch_size=batch_size, device=engine.device, backbone=backbone).accuracy


def fit(engine: Engine, train: Dataset, cfg: TrainConfig, *, micro_batch: int, seed: int,
        backbone: nn.Module | None, console: Console, name: str, grad_accum: int = 1,
        resume: Callable[[Engine], dict[str, Any] | None] | None = None,
        checkpoint: Callable[[Engine, dict[str, Any], dict[str, Any]], None] | None = None,
        every: int = 0, on_epoch: Callable[[str, dict[str, float]], None] | None = None,
        loader_options: dict[str, Any] | None = None, val: Dataset | None = None,
        stop: Callable[[Engine, dict[str, Any], dict[str, Any]], None] | None = None) -> list[dict[str, float]]:
    """Train for `cfg.epochs`, optionally resuming from and writing resumable checkpoints.

    Args:
        grad_accum: micro-steps per optimiser step (exact per epoch, see `accumulation_group`).
        resume: returns the state of the last complete checkpoint (loading it into the engine), or None. The
            state holds "epoch", "step" (micro-steps done in that epoch), "history", and this rank's "partial"
            metric sums and "rng" streams, which are restored where the uninterrupted run stood.
        checkpoint: writes a resumable checkpoint: (engine, shared state, this rank's state).
        every: also checkpoint every this many optimiser steps, counted over the whole stage (0 = at epoch ends
            only).
        on_epoch: called on every rank after each epoch (and its checkpoint) with (name, that epoch's history
            entry); sweeps use it to report progress to a scheduler.
        loader_options: DataLoader worker settings for image datasets (live mode).
        val: the validation rows; when given, every epoch ends with their accuracy (`val_accuracy` in the history
            and in what `on_epoch` receives: what a sweep's scheduler ranks trials on).
        stop: called on every rank after each optimiser step with what `checkpoint` takes; it raises to end the
            stage there (preemption, `toolkit.train.preempt`).
    """
    state = resume(engine) if resume else None
    history: list[dict[str, float]] = list(state["history"]) if state else []
    start, skip = (state["epoch"], state["step"]) if state else (0, 0)
    if state:
        console.log(f"{name}: resumed at epoch {start + 1}, micro-step {skip}")
    loader = make_loader(train, batch_size=micro_batch, shuffle=True, seed=seed, loader_options=loader_options)
    sampler = loader.sampler
    assert isinstance(sampler, ResumableSampler)
    n_micro = -(-sampler.num_samples // micro_batch)
    per_epoch = -(-n_micro // grad_accum)
    for epoch in range(start, cfg.epochs):
        first = skip if epoch == start else 0
        sampler.set_epoch(epoch)
        sampler.set_start(first * micro_batch)

        def on_step(step: int, stepped: bool, sums: dict[str, float], epoch: int = epoch) -> None:
            done = epoch * per_epoch + -(-step // grad_accum)  # optimiser steps of the stage so far
            state = {"epoch": epoch, "step": step, "history": history, "optimizer_step": done}
            if checkpoint and every and stepped and done % every == 0 and step < n_micro:
                checkpoint(engine, state, {"partial": dict(sums)})
            if stop and stepped:
                stop(engine, state, {"partial": dict(sums)})

        restore = None
        if state and epoch == start and state.get("rng") is not None:
            rng = state["rng"]
            if first:  # saved after this epoch's loader iterator was made: restore after it is made again
                restore = lambda rng=rng: set_rng_state(rng)  # noqa: E731
            else:  # saved at the end of the previous epoch, before the iterator
                set_rng_state(rng)
        t0 = time.perf_counter()
        metrics = train_epoch(engine, loader, cfg, backbone=backbone, console=console,
                              desc=f"{name} epoch {epoch + 1}/{cfg.epochs}", grad_accum=grad_accum, start=first,
                              on_step=on_step, partial=state.get("partial") if state and epoch == start else None,
                              after_iter=restore)
        metrics["seconds"] = time.perf_counter() - t0
        if val is not None:
            metrics["val_accuracy"] = _val_accuracy(engine, val, batch_size=micro_batch, backbone=backbone)
        history.append({"epoch": epoch + 1, **{k: round(v, 6) for k, v in metrics.items()}})
        console.log(f"{name} epoch {epoch + 1}/{cfg.epochs}: "
                    + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if checkpoint:
            done = (epoch + 1) * per_epoch
            checkpoint(engine, {"epoch": epoch + 1, "step": 0, "history": history, "optimizer_step": done}, {})
        if on_epoch is not None:
            on_epoch(name, history[-1])
    set_optimizer_mode(engine, train=False)  # schedule-free: the model now holds the averaged weights
    return history
