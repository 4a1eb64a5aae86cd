"""Stage `finetune`: the adapter fine-tuned under the frozen binary QPM head (CE + diversity + sparsity).

DenseResult + SelectionResult -> the DINO-QPM model: the dense model with its head replaced by the sparse head
(the selected features, the binary assignment W, and the dense model's per-feature mean and std).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.artifacts import content_key, get_or_run
from toolkit.config import AdapterConfig, FinetuneConfig, to_dict
from toolkit.distributed import dist_info, seed_everything
from toolkit.files import write_json
from toolkit.model import DinoQPM, SparseHead, save_checkpoint
from toolkit.qp import Selection
from toolkit.stages.dense import DenseResult
from toolkit.stages.select import SelectionResult
from toolkit.train import Split, TrainContext, drop_work_dir, scores, split_keys, train_model, work_dir


def sparse_model(dense: DenseResult, selection: Selection) -> DinoQPM:
    """The dense model with its head replaced by the binary QPM head (frozen W, mean and std of the dense model)."""
    sel = np.asarray(selection.selected, dtype=np.int64)
    head = SparseHead(selection=torch.from_numpy(sel), weight=torch.from_numpy(np.asarray(selection.weight)),
                      mean=torch.from_numpy(dense.mean[sel]), std=torch.from_numpy(dense.std[sel]))
    return dense.model().to_sparse(head)


def run_finetune(*, dense: DenseResult, selection: SelectionResult, train: Split, val: Split | None, test: Split,
                 adapter: AdapterConfig, cfg: FinetuneConfig, ctx: TrainContext, root: Path,
                 meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Fine-tune the whole adapter under the sparse head (CE + diversity + sparsity) on the fit rows; returns (dir,
    metrics: val/test accuracy after and before fine-tuning)."""
    # The dense key already holds the splits; val and test again so that the upstream record names them.
    upstream = {"dense": dense.key, "select": selection.key, **split_keys(train, val, test)}
    key = content_key("finetune", {"finetune": to_dict(cfg), "seed": ctx.seed}, upstream)

    def build(tmp: Path) -> dict[str, Any]:
        seed_everything(ctx.seed)
        model = sparse_model(dense, selection.selection)
        before = scores(model, val, test, ctx)
        history = train_model(model, train, cfg, ctx, name="finetune", work=work_dir(root, "finetune", key), val=val)
        after = scores(model, val, test, ctx)
        if not dist_info().is_main:
            return {}
        save_checkpoint(tmp / "checkpoint", model, kind="qpm", adapter=adapter, embed_dim=train.meta["embed_dim"],
                        n_classes=len(train.classes), grid=train.grid, meta=meta)
        write_json(tmp / "history.json", history)
        return {**after, **{f"{k}_before_finetune": v for k, v in before.items()},
                "train_accuracy": history[-1]["train_accuracy"] if history else 0.0}

    directory, manifest, _ = get_or_run(root, "finetune", key, build, config={"finetune": to_dict(cfg)},
                                        upstream=upstream, log=ctx.console.log)
    drop_work_dir(root, "finetune", key)
    return directory, manifest.metrics
