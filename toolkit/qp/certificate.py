"""The answer of the QP stage (`Selection`), its certificate, and the verification every answer passes.

Certificate fields: objective (recomputed from the assignment), bound (a valid upper bound for the full problem,
distinctness and the unused-feature link included), gap = (bound - objective) / |objective|, status (what was
proven, see `STATUSES`), seconds, solver and version, tau, lazy_rounds (MILP re-solves caused by duplicate class
sets), input_sha256 (of A and R as used), and `stats` (which component produced the answer and the bound, and how).
Every answer uses each selected feature for at least one class (docs/method.md#qp), so the head and the export keep
exactly the selected features.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.qp._checks import QPVerificationError
from toolkit.qp.problem import Assignment, Problem, objective

# What the status proves:
#   optimal     the gap is zero (below ZERO_GAP, the solvers' tolerance level);
#   within_gap  the gap is at most the requested qp.mip_gap, but not zero;
#   time_limit  an exact method (bound or MILP) ran and the time limit stopped it above qp.mip_gap;
#   heuristic   solver "heuristic": only the heuristic and its bounds ran, and the gap is above qp.mip_gap.
STATUSES = ("optimal", "within_gap", "time_limit", "heuristic")
ZERO_GAP = 1e-6
_REL_TOL = 1e-6  # recomputed objective vs the producer's claim


@dataclass(frozen=True, eq=False, kw_only=True)
class Selection:
    """k selected features, m per class with pairwise different class sets, and the certificate.

    Attributes:
        selected: (k,) int64 sorted feature indices.
        assignment: C lists of m feature indices (class order, ascending).
        weight: (C, k) float32 binary class-feature matrix; column j is feature selected[j].
    """

    selected: np.ndarray
    assignment: list[list[int]]
    weight: np.ndarray
    objective: float
    bound: float
    gap: float
    status: str
    seconds: float
    solver: str
    solver_version: str
    tau: float
    lazy_rounds: int
    input_sha256: str
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.selected.shape[0])

    @property
    def n_per_class(self) -> int:
        return len(self.assignment[0]) if self.assignment else 0

    def to_json(self) -> str:
        """JSON text with every field except `weight` (rebuilt from `selected` and `assignment` on load)."""
        payload = {
            "selected": [int(f) for f in self.selected],
            "assignment": [[int(f) for f in fs] for fs in self.assignment],
            "objective": self.objective, "bound": self.bound, "gap": self.gap, "status": self.status,
            "seconds": self.seconds, "solver": self.solver, "solver_version": self.solver_version,
            "tau": self.tau, "lazy_rounds": self.lazy_rounds, "input_sha256": self.input_sha256,
            "n_features": self.n_features, "n_per_class": self.n_per_class, "all_features_used": True,
            # JSON has no inf/NaN: a bound a stage never produced is written as null.
            "stats": {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.stats.items()},
        }
        # One line per field: readable, and a 1000-class assignment stays one line instead of 6000.
        return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v, allow_nan=False)}"
                                   for k, v in payload.items()) + "\n}"

    @classmethod
    def from_json(cls, text: str) -> Selection:
        """Inverse of `to_json`; the structure (k, m per class, distinct sets) is re-checked.

        Raises:
            QPVerificationError: the JSON is missing fields or describes an infeasible answer.
        """
        d = json.loads(text)
        missing = [k for k in ("selected", "assignment", "objective", "bound", "gap", "status", "seconds",
                               "solver", "tau", "input_sha256") if k not in d]
        if missing:
            raise QPVerificationError(f"selection JSON lacks fields {missing}")
        selected = np.asarray(d["selected"], dtype=np.int64)
        assignment = [[int(f) for f in fs] for fs in d["assignment"]]
        # Answers written before the unused-feature link existed lack the flag and may leave a feature unused.
        check_structure(selected, [tuple(fs) for fs in assignment], k=len(selected),
                        m=len(assignment[0]) if assignment else 0, n_features=None,
                        require_used=bool(d.get("all_features_used", False)))
        return cls(selected=selected, assignment=assignment, weight=weight_matrix(selected, assignment),
                   objective=float(d["objective"]), bound=float(d["bound"]), gap=float(d["gap"]),
                   status=str(d["status"]), seconds=float(d["seconds"]), solver=str(d["solver"]),
                   solver_version=str(d.get("solver_version", "")), tau=float(d["tau"]),
                   lazy_rounds=int(d.get("lazy_rounds", 0)), input_sha256=str(d["input_sha256"]),
                   stats=dict(d.get("stats", {})))


def weight_matrix(selected: np.ndarray, assignment: list[list[int]] | Assignment) -> np.ndarray:
    """(C, k) float32 binary W with W[c, j] = 1 iff class c uses feature selected[j]."""
    col = {int(f): j for j, f in enumerate(selected)}
    w = np.zeros((len(assignment), len(selected)), dtype=np.float32)
    for c, fs in enumerate(assignment):
        w[c, [col[int(f)] for f in fs]] = 1.0
    return w


def check_structure(selected: np.ndarray, assignment: Assignment, *, k: int, m: int,
                    n_features: int | None, require_used: bool = True) -> None:
    """k distinct sorted features, m distinct selected features per class, pairwise different class sets, and
    (with `require_used`) every selected feature used by at least one class."""
    sel = np.asarray(selected)
    if sel.shape != (k,) or len(np.unique(sel)) != k or not (np.diff(sel) > 0).all():
        raise QPVerificationError(f"selected must be {k} distinct ascending feature indices, got {sel.tolist()}")
    if n_features is not None and (sel.min() < 0 or sel.max() >= n_features):
        raise QPVerificationError(f"selected indices must lie in [0, {n_features})")
    chosen = set(int(f) for f in sel)
    for c, fs in enumerate(assignment):
        if len(fs) != m or len(set(fs)) != m or not set(fs) <= chosen:
            raise QPVerificationError(f"class {c} must use {m} distinct selected features, got {list(fs)}")
    sets = [frozenset(fs) for fs in assignment]
    if len(set(sets)) != len(sets):
        raise QPVerificationError("two classes use the same feature set (distinctness violated)")
    if require_used:
        unused = sorted(chosen - {int(f) for fs in assignment for f in fs})
        if unused:
            raise QPVerificationError(f"selected features {unused} are used by no class (every selected feature "
                                      f"must serve a class, so that export keeps exactly the head's features)")


def verify(problem: Problem, selected: np.ndarray, assignment: Assignment, claimed: float) -> float:
    """Check an answer against the problem and return its objective recomputed from scratch.

    Raises:
        QPVerificationError: wrong k, wrong m for some class, a repeated class set, a selected feature no class
        uses, or a recomputed objective
        that differs from `claimed` by more than 1e-6 relative.
    """
    check_structure(selected, assignment, k=problem.k, m=problem.m, n_features=problem.n_features)
    value = objective(problem, selected, assignment)
    if not math.isfinite(claimed) or abs(value - claimed) > _REL_TOL * max(abs(value), abs(claimed), 1e-9):
        raise QPVerificationError(f"recomputed objective {value!r} differs from the solver's {claimed!r}")
    return value
