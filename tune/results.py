"""A finished sweep: one row per trial, the Pareto front over accuracy and interpretability, the chosen trial, and
the files that record it (table, CSV, best.yaml, sweep.json, sweep.png).

Every decision reads the validation split (`data.val_fraction` of train): the front, the choice and the axes are
validation metrics. The test metrics are in the table, the CSV and sweep.json, in their own `test_*` columns, for
reading only: changing the test split cannot change which trial is chosen.

Interpretability axis: validation SID@5 of the DINO-QPM model (higher is better; toolkit.metrics.diversity) when
every completed trial has it. SID@5 is undefined when classes use fewer than 5 features (e.g. qp.n_per_class < 5),
so the fallback is `qp.n_per_class`, the number of features that explain each class (fewer is more interpretable:
QPM's compactness), which every trial has.

Choice rule: among the Pareto-front trials whose validation accuracy is within `tolerance` of the best, the one with
the best interpretability value; ties go to higher validation accuracy, then the earlier trial (its index in the
sweep; not its time, which depends on the machine and on which trial built the shared stages).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from toolkit.data import SPLITS
from tune.trial import SCHEDULER_METRIC, SEARCH_METRIC

STATUSES = ("ok", "stopped", "failed")
# ok: final report; stopped: no final report (ASHA ended it, or the sweep was interrupted); failed: raised


@dataclass
class TrialRow:
    trial_id: str
    status: str
    params: dict[str, Any]  # the sampled values, by dotted key
    metrics: dict[str, Any] = field(default_factory=dict)  # the last report
    reason: str | None = None  # why a failed trial failed
    iterations: int = 0

    def get(self, key: str) -> Any:
        v = self.metrics.get(key)
        return None if isinstance(v, float) and math.isnan(v) else v


@dataclass(frozen=True)
class Objective:
    key: str  # report key
    label: str
    maximize: bool
    why: str

    def better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b


ACCURACY = Objective(SEARCH_METRIC, "validation accuracy", True, "DINO-QPM accuracy on the validation split")
SID = Objective("val_sid_at_5", "validation SID@5", True,
                "SID@5 of the DINO-QPM model on the validation split (spatial diversity of the top-5 feature maps)")
COMPACTNESS = Objective("qp_n_per_class", "features/class", False,
                        "qp.n_per_class, features per class (fallback: SID@5 is missing for some completed trial)")


def failure_reason(error: BaseException | None) -> str:
    """The root cause of a trial error as one line ('ConfigError: ...'), without Ray's wrapping and traceback."""
    if error is None:
        return ""
    e, seen = error, set()
    while id(e) not in seen:  # Ray wraps the trial's exception (RayTaskError.cause, TuneError.__cause__)
        seen.add(id(e))
        # Ray Train's WorkerHealthCheckFailedError keeps why the worker could not be polled (its process died, ...)
        # in `health_check_failure`; its own message is only the worker's description.
        nxt = getattr(e, "cause", None) or getattr(e, "health_check_failure", None) or e.__cause__
        if not isinstance(nxt, BaseException):
            break
        e = nxt
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Traceback"):
        # Still wrapped: the last traceback line is "package.module.Error: message".
        head, sep, rest = lines[-1].partition(": ")
        return f"{head.rsplit('.', 1)[-1]}: {rest}" if sep else lines[-1]
    return f"{type(e).__name__}: {' '.join(lines)}"[:500]


def rows_from_results(results: Iterable[Any], keys: list[str]) -> list[TrialRow]:
    """Rows from a Ray `ResultGrid` (or any iterable of `ray.tune.Result`)."""
    rows = []
    for r in results:
        metrics = dict(r.metrics or {})
        trial_id = str(metrics.get("trial_id") or Path(r.path).name.removeprefix("trial-"))
        params = {k: (r.config or {}).get(k) for k in keys}
        if r.error is not None:
            status = "failed"
        elif metrics.get(ACCURACY.key) is not None:
            status = "ok"
        else:
            status = "stopped"
        rows.append(TrialRow(trial_id=trial_id, status=status, params=params, metrics=metrics,
                             reason=failure_reason(r.error) or None,
                             iterations=int(metrics.get("training_iteration", 0) or 0)))
    return sorted(rows, key=lambda row: row.trial_id)


def interpretability_objective(rows: list[TrialRow]) -> Objective:
    ok = [r for r in rows if r.status == "ok"]
    return SID if ok and all(r.get(SID.key) is not None for r in ok) else COMPACTNESS


def _dominates(a: TrialRow, b: TrialRow, objectives: tuple[Objective, ...]) -> bool:
    at_least = all(not o.better(b.get(o.key), a.get(o.key)) for o in objectives)
    strictly = any(o.better(a.get(o.key), b.get(o.key)) for o in objectives)
    return at_least and strictly


def pareto_front(rows: list[TrialRow], objectives: tuple[Objective, ...]) -> list[TrialRow]:
    """Completed trials not dominated by another on every objective (ties are all kept)."""
    pool = [r for r in rows if r.status == "ok" and all(r.get(o.key) is not None for o in objectives)]
    return [r for r in pool if not any(_dominates(o, r, objectives) for o in pool if o is not r)]


def _order(trial_id: str) -> tuple[int, str]:
    """Tune's ids end in the trial's index in the sweep ('<hash>_00003')."""
    tail = trial_id.rsplit("_", 1)[-1]
    return (int(tail), trial_id) if tail.isdigit() else (2**31, trial_id)


def choose_best(front: list[TrialRow], interp: Objective, *, tolerance: float) -> tuple[TrialRow, str]:
    """(chosen trial, the rule in words with the numbers it used)."""
    if not front:
        raise ValueError("no completed trial: nothing to choose")
    best_acc = max(r.get(ACCURACY.key) for r in front)
    near = [r for r in front if r.get(ACCURACY.key) >= best_acc - tolerance]
    sign = 1 if interp.maximize else -1
    # The last tie-break is the trial's order in the sweep, not its time: the time depends on the machine and on
    # which trial happened to build the shared stages, and the same sweep must choose the same trial.
    chosen = min(near, key=lambda r: (-sign * r.get(interp.key), -r.get(ACCURACY.key), _order(r.trial_id)))
    rule = (f"Pareto front over (validation accuracy: higher is better, {interp.label}: "
            f"{'higher' if interp.maximize else 'lower'} is better); among the {len(near)} front trial(s) within "
            f"{tolerance} of the best validation accuracy {best_acc:.4f}, the one with the best {interp.label}; ties "
            "go to higher validation accuracy, then the earlier trial; test metrics are not used")
    return chosen, rule


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


# (report key, table label): validation columns decide, test columns are for reading only.
DECIDING = (("val_accuracy", "val accuracy"), ("val_sid_at_5", "val SID@5"), ("val_plausibility", "val plausibility"))
READING = (("test_accuracy", "test accuracy"), ("test_sid_at_5", "test SID@5"),
           ("test_plausibility", "test plausibility"))
OTHER = (("qp_gap", "QP gap"), ("qp_status", "QP status"), ("seconds", "time (s)"))
COLUMNS = tuple(k for k, _ in (*DECIDING, *READING, *OTHER))


def build_table(rows: list[TrialRow], keys: list[str], *, front: set[str], chosen: str | None) -> Table:
    """The rich table: one row per trial (full trial id, config, validation metrics, then test metrics for reading,
    QP gap, time, status)."""
    table = Table(title="sweep trials (* Pareto front, > chosen; decided on validation, test columns for reading only)",
                  show_lines=False)
    table.add_column("", no_wrap=True)  # the marks, apart so that the id keeps its full width
    table.add_column("trial", no_wrap=True, min_width=max([len(r.trial_id) for r in rows], default=5))
    for k in keys:
        table.add_column(k.split(".", 1)[1] if "." in k else k, justify="right")
    for _, label in (*DECIDING, *READING, *OTHER):
        table.add_column(label, justify="right", style="dim" if label.startswith("test") else None)
    table.add_column("status / reason", overflow="fold", max_width=60)
    for r in rows:
        mark = (">" if r.trial_id == chosen else "") + ("*" if r.trial_id in front else "")
        note = r.status if r.status != "failed" else f"failed: {r.reason}"
        cells = [mark, r.trial_id, *[_fmt(r.params.get(k)) for k in keys], *[_fmt(r.get(c)) for c in COLUMNS], note]
        table.add_row(*[escape(c) for c in cells])  # reasons can hold brackets that rich would read as markup
    return table


def write_csv(rows: list[TrialRow], keys: list[str], path: Path, *, front: set[str], chosen: str | None) -> None:
    """trials.csv: every report key of every trial, validation and test metrics in their own labelled columns."""
    per_split = ("accuracy_before_finetune", "class_independence", "contrastiveness", "correlation",
                 "structural_grounding")
    extra = (*(f"{m}_{s}_accuracy" for m in ("dense", "probe") for s in ("val", "test")),
             *(f"{s}_{k}" for s in ("val", "test") for k in per_split), SCHEDULER_METRIC, "qp_objective",
             "qp_bound", "qp_seconds", "qp_solver", "qp_n_features", "qp_n_per_class",
             "train_accuracy", "backbone_passes", "backbone_builds", "trained_probe", "trained_dense",
             "trained_finetune", "run_dir")
    header = ["trial_id", "status", "reason", *keys, *COLUMNS, *extra, "iterations", "pareto", "chosen"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([r.trial_id, r.status, r.reason or "", *[r.params.get(k) for k in keys],
                        *[r.get(c) for c in (*COLUMNS, *extra)], r.iterations, r.trial_id in front,
                        r.trial_id == chosen])


def write_best(chosen: TrialRow, rule: str, interp: Objective, keys: list[str], path: Path) -> None:
    """best.yaml: the chosen trial's resolved config (loadable by load_config / launch/train.py), the rule and
    the numbers that chose it as comments on top."""
    run_dir = Path(chosen.get("run_dir"))
    header = [f"Chosen by the sweep: trial {chosen.trial_id}, run {run_dir}",
              f"Rule: {rule}",
              f"Interpretability metric: {interp.key} ({interp.why})",
              f"Chosen on validation: val_accuracy={_fmt(chosen.get('val_accuracy'))} "
              f"{interp.key}={_fmt(chosen.get(interp.key))} qp_gap={_fmt(chosen.get('qp_gap'))} "
              f"seconds={_fmt(chosen.get('seconds'))}",
              f"Test, for reading only (not used to choose): test_accuracy={_fmt(chosen.get('test_accuracy'))} "
              f"test_sid_at_5={_fmt(chosen.get('test_sid_at_5'))}",
              "Sampled: " + " ".join(f"{k}={chosen.params.get(k)!r}" for k in keys),
              f"Train it again with: python launch/train.py --config {path.name}"]
    body = (run_dir / "config.yaml").read_text()
    path.write_text("".join(f"# {line}\n" for line in header) + body)


def summary_json(rows: list[TrialRow], *, front: list[TrialRow], chosen: TrialRow | None, rule: str | None,
                 interp: Objective) -> dict[str, Any]:
    """Everything above in one JSON document (sweep.json)."""
    return {
        "interpretability_metric": {"key": interp.key, "maximize": interp.maximize, "why": interp.why},
        "accuracy_metric": {"key": ACCURACY.key, "why": ACCURACY.why},
        "decided_on": "validation (data.val_fraction of train); test_* metrics are for reading only",
        "rule": rule, "chosen": chosen.trial_id if chosen else None,
        "chosen_run_dir": chosen.get("run_dir") if chosen else None,
        "pareto_front": [r.trial_id for r in front],
        "counts": {s: sum(r.status == s for r in rows) for s in STATUSES},
        "shared_work": shared_work(rows),
        "trials": [{"trial_id": r.trial_id, "status": r.status, "reason": r.reason, "params": r.params,
                    "iterations": r.iterations,
                    "metrics": {k: v for k, v in r.metrics.items() if isinstance(v, (int, float, str, bool))
                                or v is None}} for r in rows],
    }


def shared_work(rows: list[TrialRow]) -> dict[str, Any]:
    """What the whole sweep computed, summed over its trials' last reports (stopped trials included).

    backbone_passes counts token stores extracted (one per split when the trials share them, so 2 = one pass over
    train and one over test); backbone_constructions counts models built, which can exceed 1 when two trials each
    extracted one split; it is only known for trials that finished.
    """
    ran = [r for r in rows if r.status != "failed"]
    total = {k: sum(r.get(k) or 0 for r in ran) for k in ("backbone_passes", "backbone_builds", "trained_probe",
                                                          "trained_dense", "trained_finetune")}
    return {"backbone_passes": total["backbone_passes"],
            "backbone_passes_per_split": total["backbone_passes"] / len(SPLITS),
            "probe_trainings": total["trained_probe"], "dense_trainings": total["trained_dense"],
            "finetune_trainings": total["trained_finetune"], "backbone_constructions": total["backbone_builds"]}


def write_summary(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, default=str))
