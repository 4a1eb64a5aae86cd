"""Stages after the dense model: the QP selection and the fine-tuning with the sparse QPM head.

qp:       DenseResult -> QP inputs A, R (toolkit.qp_inputs) -> `solve_qp` -> Selection (with its certificate)
finetune: DenseResult + Selection -> the DINO-QPM model (adapter fine-tuned under the frozen binary head)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.artifacts import content_key, get_or_run, write_json
from toolkit.checkpoint import load_checkpoint, save_checkpoint
from toolkit.config import AdapterConfig, FinetuneConfig, QPConfig, to_dict
from toolkit.dense import DenseResult, Split, TrainContext, drop_work_dir, test_outputs, train_model, work_dir
from toolkit.model import DinoQPM, SparseHead
from toolkit.qp import Selection, solve_qp
from toolkit.qp_inputs import correlation_A, save_inputs, similarity_R
from toolkit.runtime import broadcast_object, dist_info, seed_everything


@dataclass(frozen=True)
class SelectionResult:
    directory: Path
    key: str
    selection: Selection


def run_selection(*, dense: DenseResult, n_classes: int, cfg: QPConfig, root: Path,
                  ctx: TrainContext) -> SelectionResult:
    """Compute A and R from the dense model's pooled train features and solve the QPM problem."""
    key = content_key("qp", to_dict(cfg), {"dense": dense.key})

    def build(tmp: Path) -> dict[str, Any]:
        # Solved once, on rank 0; the other ranks receive the same selection (one model on every rank).
        sel = None
        if dist_info().is_main:
            feats, labels = dense.train_features, dense.train_labels
            A = correlation_A(feats, labels, n_classes)
            R = similarity_R(A)
            save_inputs(tmp / "inputs.npz", A, R)
            sel = solve_qp(A, R, cfg, log=ctx.console.log)
            (tmp / "selection.json").write_text(sel.to_json())
        sel = broadcast_object(sel)
        return {k: getattr(sel, k) for k in ("objective", "bound", "gap", "status", "seconds", "solver", "tau",
                                               "lazy_rounds")}

    directory, manifest, _ = get_or_run(root, "qp", key, build, config=to_dict(cfg), upstream={"dense": dense.key},
                                        log=ctx.console.log)
    selection = Selection.from_json((directory / "selection.json").read_text())
    return SelectionResult(directory, key, selection)


def sparse_model(dense: DenseResult, selection: Selection) -> DinoQPM:
    """The dense model with its head replaced by the binary QPM head (frozen W, mean and std of the dense model)."""
    sel = np.asarray(selection.selected, dtype=np.int64)
    head = SparseHead(selection=torch.from_numpy(sel), weight=torch.from_numpy(np.asarray(selection.weight)),
                      mean=torch.from_numpy(dense.mean[sel]), std=torch.from_numpy(dense.std[sel]))
    return dense.model().to_sparse(head)


def run_finetune(*, dense: DenseResult, selection: SelectionResult, train: Split, test: Split,
                 adapter: AdapterConfig, cfg: FinetuneConfig, ctx: TrainContext, root: Path,
                 meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Fine-tune the whole adapter under the sparse head (CE + diversity + sparsity); returns (dir, metrics)."""
    key = content_key("finetune", {"finetune": to_dict(cfg), "seed": ctx.seed},
                      {"dense": dense.key, "qp": selection.key})

    def build(tmp: Path) -> dict[str, Any]:
        seed_everything(ctx.seed)
        model = sparse_model(dense, selection.selection)
        before = test_outputs(model, test, ctx).accuracy
        history = train_model(model, train, cfg, ctx, name="finetune", work=work_dir(root, "finetune", key))
        after = test_outputs(model, test, ctx).accuracy
        if not dist_info().is_main:
            return {}
        save_checkpoint(tmp / "checkpoint", model, kind="qpm", adapter=adapter, embed_dim=train.meta["embed_dim"],
                        n_classes=len(train.classes), grid=train.grid, meta=meta)
        write_json(tmp / "history.json", history)
        return {"accuracy": after, "accuracy_before_finetune": before,
                "train_accuracy": history[-1]["train_accuracy"] if history else 0.0}

    directory, manifest, _ = get_or_run(root, "finetune", key, build, config={"finetune": to_dict(cfg)},
                                        upstream={"dense": dense.key, "qp": selection.key}, log=ctx.console.log)
    drop_work_dir(root, "finetune", key)
    return directory, manifest.metrics


def load_qpm(directory: Path) -> DinoQPM:
    model, _ = load_checkpoint(directory / "checkpoint")
    assert isinstance(model, DinoQPM)
    return model
