"""Stage `dense`: the adapter and dense head (CE + feature-diversity loss) trained on the token cache.

Split(train fit rows, val, test) -> DenseResult: the dense model's checkpoint, its pooled fit-row features (the input of
the QP's A and R) and the per-feature mean/std that the sparse head freezes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.artifacts import content_key, get_or_run
from toolkit.config import AdapterConfig, DenseConfig, to_dict
from toolkit.distributed import dist_info, seed_everything
from toolkit.files import write_json
from toolkit.model import DinoQPM, build_dense_model, load_checkpoint, save_checkpoint
from toolkit.train import Split, TrainContext, drop_work_dir, evaluate, scores, split_keys, train_model, work_dir


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


def run_dense(*, train: Split, val: Split | None, test: Split, adapter: AdapterConfig, cfg: DenseConfig,
              ctx: TrainContext, root: Path, meta: dict[str, Any]) -> DenseResult:
    """Train the dense model (adapter + dense head, CE + feature-diversity loss) on the fit rows `train`, pool their
    features (the QP's input) and score it on validation and test."""
    upstream = split_keys(train, val, test)
    key = content_key("dense", {"adapter": to_dict(adapter), "dense": to_dict(cfg), "seed": ctx.seed}, upstream)

    def build(tmp: Path) -> dict[str, Any]:
        seed_everything(ctx.seed)
        model = build_dense_model(adapter, in_dim=train.meta["embed_dim"], n_classes=len(train.classes),
                                  dropout=cfg.dropout, grid=train.grid)
        history = train_model(model, train, cfg, ctx, name="dense", work=work_dir(root, "dense", key), val=val)
        model = model.to(ctx.device)
        tr = evaluate(model, train.dataset(), batch_size=ctx.eval_batch_size, device=ctx.device,
                      backbone=ctx.backbone, console=ctx.console, desc="dense features (train)")
        acc = scores(model, val, test, ctx)
        assert tr.features is not None
        if not dist_info().is_main:  # every rank trained and evaluated; rank 0 alone writes
            return {}
        np.save(tmp / "train_features.npy", tr.features.astype(np.float32))
        np.save(tmp / "train_labels.npy", tr.labels)
        # Population statistics over the train set, in eval mode (docs/method.md#model); frozen in the sparse head.
        np.save(tmp / "mean.npy", tr.features.mean(0).astype(np.float32))
        np.save(tmp / "std.npy", tr.features.std(0).astype(np.float32))
        save_checkpoint(tmp / "checkpoint", model, kind="dense", adapter=adapter, embed_dim=train.meta["embed_dim"],
                        n_classes=len(train.classes), grid=train.grid, meta=meta)
        write_json(tmp / "history.json", history)
        return {"train_accuracy": tr.accuracy, **acc}

    directory, manifest, _ = get_or_run(root, "dense", key, build, config={"adapter": to_dict(adapter),
                                        "dense": to_dict(cfg)}, upstream=upstream, log=ctx.console.log)
    drop_work_dir(root, "dense", key)
    return DenseResult(directory, key, manifest.metrics)
