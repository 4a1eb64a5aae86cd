"""Stage `select`: the QPM selection. A and R from the dense model's pooled train features, then `solve_qp`.

DenseResult -> SelectionResult (the k selected features, the binary class x feature assignment and the solver's
certificate). Solved once, on rank 0, and broadcast, so every rank fine-tunes the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.artifacts import content_key, get_or_run
from toolkit.config import QPConfig, to_dict
from toolkit.distributed import broadcast_object, dist_info
from toolkit.qp import Selection, solve_qp
from toolkit.qp.inputs import correlation_A, save_inputs, similarity_R
from toolkit.stages.dense import DenseResult
from toolkit.train import TrainContext


@dataclass(frozen=True)
class SelectionResult:
    directory: Path
    key: str
    selection: Selection


def run_select(*, dense: DenseResult, n_classes: int, cfg: QPConfig, root: Path,
               ctx: TrainContext) -> SelectionResult:
    """Compute A and R from the dense model's pooled train features and solve the QPM problem."""
    key = content_key("select", to_dict(cfg), {"dense": dense.key})

    def build(tmp: Path) -> dict[str, Any]:
        # Solved once, on rank 0; the other ranks receive the same selection (one model on every rank).
        sel = None
        if dist_info().is_main:
            feats, labels = dense.train_features, dense.train_labels
            A = correlation_A(feats, labels, n_classes)
            R = similarity_R(A, keep_negative=cfg.redundancy_rule == "reference")
            save_inputs(tmp / "inputs.npz", A, R)
            sel = solve_qp(A, R, cfg, log=ctx.console.log)
            (tmp / "selection.json").write_text(sel.to_json())
        sel = broadcast_object(sel)
        return {k: getattr(sel, k) for k in ("objective", "bound", "gap", "status", "seconds", "solver", "tau",
                                               "lazy_rounds")}

    directory, manifest, _ = get_or_run(root, "select", key, build, config=to_dict(cfg),
                                        upstream={"dense": dense.key}, log=ctx.console.log)
    selection = Selection.from_json((directory / "selection.json").read_text())
    return SelectionResult(directory, key, selection)
