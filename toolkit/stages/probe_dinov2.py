"""Stage `probe_dinov2`: DINOv2's own linear-evaluation protocol on the token cache, the stronger baseline.

DINOv2 (Oquab et al., arXiv 2304.07193; facebookresearch/dinov2 `eval/linear.py`) evaluates a frozen backbone with
linear classifiers on the concatenated CLS tokens of the last n blocks (each after the final LayerNorm), optionally
with the average patch token of the last block appended, and picks n, the pooling and the learning rate by the
accuracy of every combination trained side by side. Its classifiers: `nn.Linear` with weights ~ N(0, 0.01), bias 0;
SGD with momentum 0.9, no weight decay, cosine decay to 0, learning rates from a fixed grid times batch / 256.

Here the choice is made honestly: on a seeded, class-stratified share (`val_fraction`) of the train split; the
chosen combination is then retrained on the whole train split and scored once on the test split
(docs/method.md#baselines). The features live in memory (N x at most 5 D floats), so every combination trains in
one pass over mini-batches on the run's device; every rank computes the same result and rank 0 writes it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolkit.artifacts import content_key, get_or_run
from toolkit.cache import TokenStore
from toolkit.config import ProbeDinov2Config, to_dict
from toolkit.distributed import dist_info, seed_everything
from toolkit.files import write_json
from toolkit.train import TrainContext


def probe_inputs(store: TokenStore, n_blocks: int, avgpool: bool) -> np.ndarray:
    """DINOv2's `create_linear_input`: CLS of the last `n_blocks` blocks [+ average patch token], (N, (n[+1]) D).

    Raises:
        ValueError: the store predates the cached block tokens (rebuild it: any key change does).
    """
    if store.cls_blocks is None or store.patch_mean is None:
        raise ValueError(f"token store {store.directory} has no cls_blocks.npy / patch_mean.npy; it was written by an "
                         "older toolkit: delete it (or change cache.root) so that it is rebuilt")
    blocks = np.asarray(store.cls_blocks[:, -n_blocks:], dtype=np.float32)
    parts = [blocks.reshape(len(blocks), -1)]
    if avgpool:
        parts.append(np.asarray(store.patch_mean, dtype=np.float32))
    return np.concatenate(parts, 1)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val) indices: a seeded share `fraction` of every class (at least one sample if the class has two)."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(fraction * len(idx)))
        n_val = min(max(n_val, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def train_heads(inputs: list[torch.Tensor], labels: torch.Tensor, lrs: list[float], n_classes: int, *,
                epochs: int, batch_size: int, seed: int) -> list[list[nn.Linear]]:
    """Train one linear head per (input variant, learning rate) side by side, DINOv2-style.

    Args:
        inputs: per variant (N, d_v) float32 features on the training device.
        labels: (N,) int64 on the same device.
        lrs: base learning rates; each is scaled by batch_size / 256.

    Returns:
        heads[v][l]: the trained head of variant v at learning rate lrs[l].
    """
    gen = torch.Generator().manual_seed(seed)
    dev = labels.device
    heads: list[list[nn.Linear]] = []
    groups = []
    for x in inputs:
        row = []
        for lr in lrs:
            head = nn.Linear(x.shape[1], n_classes).to(dev)
            with torch.no_grad():
                head.weight.normal_(0.0, 0.01)
                head.bias.zero_()
            row.append(head)
            groups.append({"params": list(head.parameters()), "lr": lr * batch_size / 256})
        heads.append(row)
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    n = len(labels)
    steps = epochs * max(1, -(-n // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(dev)
        for start in range(0, n, batch_size):
            b = order[start:start + batch_size]
            y = labels[b]
            loss = sum(loss_fn(head(x[b]), y) for x, row in zip(inputs, heads) for head in row)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # heads are independent: the sum's gradient is each head's own
            opt.step()
            sched.step()
    return heads


@torch.no_grad()
def _accuracy(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((head(x).argmax(1) == y).double().mean()) if len(y) else 0.0


def run_probe_dinov2(*, train: TokenStore, test: TokenStore, cfg: ProbeDinov2Config, ctx: TrainContext,
                     root: Path) -> tuple[Path, dict[str, Any]]:
    """Choose (n blocks, avgpool, lr) on a held-out share of train, retrain on all of train, score on test."""
    key = content_key("probe_dinov2", {"probe_dinov2": to_dict(cfg), "seed": ctx.seed},
                      {"train": train.key, "test": test.key})

    def build(tmp: Path) -> dict[str, Any]:
        seed_everything(ctx.seed)
        dev = ctx.device
        available = train.cls_blocks.shape[1] if train.cls_blocks is not None else 1
        # A backbone shallower than n blocks offers only its own depth (tiny test backbones).
        variants = sorted({(min(n, available), bool(p)) for n, p in itertools.product(cfg.n_blocks, cfg.avgpool)})
        n_classes = len(train.classes)
        y_all = torch.from_numpy(train.labels).to(dev)
        fit, val = stratified_holdout(train.labels, cfg.val_fraction, ctx.seed)
        feats = {v: torch.from_numpy(probe_inputs(train, *v)).to(dev) for v in variants}
        heads = train_heads([feats[v][fit] for v in variants], y_all[fit], list(cfg.lrs), n_classes,
                            epochs=cfg.epochs, batch_size=cfg.batch_size, seed=ctx.seed)
        grid = [{"n_blocks": v[0], "avgpool": v[1], "lr": lr,
                 "val_accuracy": _accuracy(heads[i][j], feats[v][val], y_all[val])}
                for i, v in enumerate(variants) for j, lr in enumerate(cfg.lrs)]
        best = max(range(len(grid)), key=lambda i: grid[i]["val_accuracy"])  # first of ties: fewer inputs, lower lr
        choice = grid[best]
        v = (choice["n_blocks"], choice["avgpool"])
        ctx.console.log(f"probe_dinov2: chose n_blocks={v[0]} avgpool={v[1]} lr={choice['lr']:g} "
                        f"(held-out accuracy {choice['val_accuracy']:.4f} of {len(grid)} heads)")
        final = train_heads([feats[v]], y_all, [choice["lr"]], n_classes, epochs=cfg.epochs,
                            batch_size=cfg.batch_size, seed=ctx.seed)[0][0]
        x_test = torch.from_numpy(probe_inputs(test, *v)).to(dev)
        y_test = torch.from_numpy(test.labels).to(dev)
        acc = _accuracy(final, x_test, y_test)
        train_acc = _accuracy(final, feats[v], y_all)
        if not dist_info().is_main:
            return {}
        np.savez(tmp / "head.npz", weight=final.weight.detach().cpu().numpy(),
                 bias=final.bias.detach().cpu().numpy())
        write_json(tmp / "selection.json", {"choice": choice, "grid": grid, "n_fit": int(len(fit)),
                                            "n_val": int(len(val))})
        return {"accuracy": acc, "train_accuracy": train_acc, "n_blocks": v[0], "avgpool": v[1],
                "lr": choice["lr"], "val_accuracy": choice["val_accuracy"]}

    directory, manifest, _ = get_or_run(root, "probe_dinov2", key, build, config={"probe_dinov2": to_dict(cfg)},
                                        upstream={"train": train.key, "test": test.key}, log=ctx.console.log)
    return directory, manifest.metrics
