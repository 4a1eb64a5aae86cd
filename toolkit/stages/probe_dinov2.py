"""Stage `probe_dinov2`: DINOv2's own linear-evaluation protocol on the token cache, the stronger baseline.

DINOv2 (Oquab et al., arXiv 2304.07193; facebookresearch/dinov2 `eval/linear.py`) evaluates a frozen backbone with
linear classifiers on the concatenated CLS tokens of the last n blocks (each after the final LayerNorm), optionally
with the average patch token of the last block appended, and picks n, the pooling and the learning rate by the
accuracy of every combination trained side by side. Its classifiers: `nn.Linear` with weights ~ N(0, 0.01), bias 0;
SGD with momentum 0.9, no weight decay, cosine decay to 0, learning rates from a fixed grid times batch / 256.

Here the choice is made honestly: every head trains on the fit rows of the train split and the best on the run's
validation split (`data.val_fraction`, `toolkit.data.splits`) is kept and scored on validation and test
(docs/method.md#baselines). With nothing held out (`data.val_fraction=0`) the probe still needs a choice: it draws
the same kind of split itself (`OWN_VAL_FRACTION` of train, same function and seed), chooses there and retrains the
chosen head on the whole train split, which is what it did before the run had a validation split. The features live
in memory (N x at most 5 D floats), so every combination trains in one pass over mini-batches on the run's device;
every rank computes the same result and rank 0 writes it.
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
from toolkit.config import DataConfig, ProbeDinov2Config, to_dict
from toolkit.data import stratified_holdout
from toolkit.distributed import dist_info, seed_everything
from toolkit.files import write_json
from toolkit.train import TrainContext, split_keys

OWN_VAL_FRACTION = 0.1  # the probe's own held-out share when the run holds out nothing (data.val_fraction=0)


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


def run_probe_dinov2(*, train: Any, val: Any | None, test: TokenStore, cfg: ProbeDinov2Config, data: DataConfig,
                     ctx: TrainContext, root: Path) -> tuple[Path, dict[str, Any]]:
    """Choose (n blocks, avgpool, lr) on the validation rows, keep that head (trained on the fit rows `train`) and
    score it on validation and test. `train` and `val` are TokenStore or `toolkit.cache.StoreRows` views.

    Returns:
        (directory, metrics: val_accuracy (None without a validation split), test_accuracy, train_accuracy and
        the choice n_blocks, avgpool, lr, chosen_on).
    """
    upstream = split_keys(train, val, test)
    own = {"own_val_fraction": OWN_VAL_FRACTION, "data_seed": data.seed} if val is None else {}
    key = content_key("probe_dinov2", {"probe_dinov2": to_dict(cfg), "seed": ctx.seed, **own}, upstream)

    def build(tmp: Path) -> dict[str, Any]:
        seed_everything(ctx.seed)
        dev = ctx.device
        available = train.cls_blocks.shape[1] if train.cls_blocks is not None else 1
        # A backbone shallower than n blocks offers only its own depth (tiny test backbones).
        variants = sorted({(min(n, available), bool(p)) for n, p in itertools.product(cfg.n_blocks, cfg.avgpool)})
        n_classes = len(train.classes)
        y_train = torch.from_numpy(np.asarray(train.labels)).to(dev)
        x_train = {v: torch.from_numpy(probe_inputs(train, *v)).to(dev) for v in variants}
        if val is not None:  # the run's validation split
            x_fit, y_fit = x_train, y_train
            x_val = {v: torch.from_numpy(probe_inputs(val, *v)).to(dev) for v in variants}
            y_val = torch.from_numpy(np.asarray(val.labels)).to(dev)
            chosen_on, n_fit, n_val = "the validation split (data.val_fraction)", len(y_fit), len(y_val)
        else:  # nothing held out: the probe's own share of train, the same draw as the run's would be
            fit, held = stratified_holdout(np.asarray(train.labels), OWN_VAL_FRACTION, data.seed)
            x_fit, y_fit = {v: x[fit] for v, x in x_train.items()}, y_train[fit]
            x_val, y_val = {v: x[held] for v, x in x_train.items()}, y_train[held]
            chosen_on, n_fit, n_val = f"its own {OWN_VAL_FRACTION:g} share of train", len(fit), len(held)
        heads = train_heads([x_fit[v] for v in variants], y_fit, list(cfg.lrs), n_classes,
                            epochs=cfg.epochs, batch_size=cfg.batch_size, seed=ctx.seed)
        grid = [{"n_blocks": v[0], "avgpool": v[1], "lr": lr,
                 "val_accuracy": _accuracy(heads[i][j], x_val[v], y_val)}
                for i, v in enumerate(variants) for j, lr in enumerate(cfg.lrs)]
        best = max(range(len(grid)), key=lambda i: grid[i]["val_accuracy"])  # first of ties: fewer inputs, lower lr
        choice = grid[best]
        v = (choice["n_blocks"], choice["avgpool"])
        ctx.console.log(f"probe_dinov2: chose n_blocks={v[0]} avgpool={v[1]} lr={choice['lr']:g} on "
                        f"{chosen_on} (accuracy {choice['val_accuracy']:.4f} of {len(grid)} heads)")
        final = heads[best // len(cfg.lrs)][best % len(cfg.lrs)]
        if val is None:  # the own share was for choosing only: the kept head trains on the whole train split
            final = train_heads([x_train[v]], y_train, [choice["lr"]], n_classes, epochs=cfg.epochs,
                                batch_size=cfg.batch_size, seed=ctx.seed)[0][0]
        x_test = torch.from_numpy(probe_inputs(test, *v)).to(dev)
        y_test = torch.from_numpy(test.labels).to(dev)
        out = {"val_accuracy": choice["val_accuracy"] if val is not None else None,
               "test_accuracy": _accuracy(final, x_test, y_test),
               "train_accuracy": _accuracy(final, x_train[v], y_train),
               "n_blocks": v[0], "avgpool": v[1], "lr": choice["lr"], "chosen_on": chosen_on}
        if not dist_info().is_main:
            return {}
        np.savez(tmp / "head.npz", weight=final.weight.detach().cpu().numpy(),
                 bias=final.bias.detach().cpu().numpy())
        write_json(tmp / "selection.json", {"choice": choice, "grid": grid, "n_fit": int(n_fit),
                                            "n_val": int(n_val), "chosen_on": chosen_on})
        return out

    directory, manifest, _ = get_or_run(root, "probe_dinov2", key, build, config={"probe_dinov2": to_dict(cfg)},
                                        upstream=upstream, log=ctx.console.log)
    return directory, manifest.metrics
