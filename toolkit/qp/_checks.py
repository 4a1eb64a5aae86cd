"""Errors of the QP stage and the pre-checks that run before any solving.

Every check names the offending quantity and the fix, so a wrong CLI call or config fails in milliseconds with a
message a person can act on, instead of deep inside a solver.
"""

from __future__ import annotations

import math

import numpy as np

from toolkit.config import QPConfig


class QPInputError(ValueError):
    """A or R is malformed: wrong shape or dtype, NaN/inf, negative similarities."""


class QPInfeasibleError(QPInputError):
    """The settings admit no solution: k > F, m > k, more classes than distinct m-subsets of k features, or more
    features than class slots (k > m C), which would leave a selected feature unused."""


class QPSolverError(RuntimeError):
    """The requested MILP solver is not installed or not licensed, or it failed."""


class QPVerificationError(RuntimeError):
    """An answer failed verification (a bug: answers are checked before they are returned)."""


def _as_matrix(name: str, value: object) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and similar
        raise QPInputError(f"{name} could not be read as an array ({exc})") from exc
    if arr.ndim != 2:
        raise QPInputError(f"{name} must be a 2-D matrix, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == np.bool_):
        raise QPInputError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise QPInputError(f"{name} has {int(bad.sum())} non-finite entries (first at {idx}); recompute it with "
                           f"toolkit.qp.inputs (dead features give 0 rows there, not NaN)")
    return arr


def check_inputs(A: object, R: object | None, cfg: QPConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate A, R and the config against each other before anything is solved.

    Args:
        A: (F, C) feature-class correlation.
        R: (F, F) feature-feature similarity or None (computed from A later).
        cfg: the QP settings (k = cfg.n_features, m = cfg.n_per_class).

    Returns:
        A and R as float64 arrays (R None if not given).

    Raises:
        QPInputError: shapes, dtypes or values are wrong.
        QPInfeasibleError: k > F, m > k, C > binomial(k, m), or k > m C (some selected feature would be unused).
    """
    a = _as_matrix("A", A)
    n_feat, n_cls = a.shape
    if n_feat == 0 or n_cls == 0:
        raise QPInputError(f"A must have at least one feature and one class, got shape {a.shape}")
    r = None
    if R is not None:
        r = _as_matrix("R", R)
        if r.shape != (n_feat, n_feat):
            raise QPInputError(f"R must be (F, F) = ({n_feat}, {n_feat}) to match A's {n_feat} feature rows, got "
                               f"shape {r.shape}; compute it with toolkit.qp.inputs.similarity_R(A) or omit it")
        off = r[~np.eye(n_feat, dtype=bool)]
        if off.size and off.min() < 0 and cfg.redundancy_rule != "reference":  # the reference rule keeps them
            raise QPInputError(f"R has negative similarities (min {off.min():.4g}); the clique rule needs "
                               f"negatives set to 0 (toolkit.qp.inputs.similarity_R does this) or use "
                               f"redundancy_rule=reference")
    k, m = cfg.n_features, cfg.n_per_class
    if k > n_feat:
        raise QPInfeasibleError(f"n_features k={k} exceeds the F={n_feat} features (rows of A); choose "
                                f"k <= {n_feat} (qp.n_features / --n-features)")
    if not 1 <= m <= k:
        raise QPInfeasibleError(f"n_per_class m={m} must be in [1, k={k}]; lower qp.n_per_class / --n-per-class")
    n_sets = math.comb(k, m)
    if n_cls > n_sets:
        raise QPInfeasibleError(f"C={n_cls} classes need pairwise different feature sets, but k={k} features give "
                                f"only binomial({k}, {m}) = {n_sets} distinct sets of m={m}; raise k or change m so "
                                f"that binomial(k, m) >= {n_cls}")
    if k > m * n_cls:
        raise QPInfeasibleError(f"every selected feature must be used by some class, but C={n_cls} classes with "
                                f"m={m} features each use at most {m * n_cls} < k={k} features; lower "
                                f"qp.n_features / --n-features to <= {m * n_cls} or raise qp.n_per_class")
    tau = cfg.redundancy_threshold
    if tau is not None and not math.isfinite(tau):
        raise QPInputError(f"redundancy_threshold must be a finite number or null, got {tau}")
    return a, r


def check_solver_name(name: str) -> str:
    """Lower-case solver name, one of auto/highs/scip/gurobi/heuristic."""
    allowed = ("auto", "highs", "scip", "gurobi", "heuristic")
    low = name.lower()
    if low not in allowed:
        raise QPSolverError(f"unknown solver {name!r}; choose one of {', '.join(allowed)}")
    return low


def rel_gap(objective: float, bound: float) -> float:
    """(bound - objective) / |objective|, the relative optimality gap of a maximisation (>= 0 up to rounding)."""
    return max(0.0, bound - objective) / max(abs(objective), 1e-9)
