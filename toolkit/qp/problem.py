"""The QPM instance in solver-friendly form, and the one function that scores an answer.

Every method (heuristic, MILP, brute force in the tests) is judged by `objective`, computed from the returned
selection and assignment alone, so a solver's own number is never trusted without a recomputation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

Assignment = list[tuple[int, ...]]  # per class (class order), the sorted feature indices it uses


@dataclass(frozen=True, eq=False, kw_only=True)
class Problem:
    """One instance: maximise alpha <A, X> - sum over selected penalised pairs of w * R[i, j].

    Attributes:
        A: (F, C) float64 feature-class correlation.
        pi, pj: (P,) int64 penalised pairs, pi < pj, R[pi, pj] >= tau and > 0.
        pw: (P,) float64 pair penalties w * R[pi, pj].
        k: features selected globally.
        m: features per class.
        tau: redundancy threshold that defined the pairs.
        w: redundancy weight.
    """

    A: np.ndarray
    pi: np.ndarray
    pj: np.ndarray
    pw: np.ndarray
    k: int
    m: int
    tau: float
    w: float

    @property
    def n_features(self) -> int:
        return int(self.A.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.A.shape[1])

    @property
    def alpha(self) -> float:
        """1000 / (m C): keeps the A term at a fixed scale across datasets (as in QPM; docs/method.md#qp)."""
        return 1000.0 / (self.m * self.n_classes)

    @cached_property
    def W(self) -> sp.csr_matrix:
        """(F, F) symmetric sparse pair penalties (w * R on penalised pairs, 0 elsewhere)."""
        n = self.n_features
        rows = np.concatenate([self.pi, self.pj])
        cols = np.concatenate([self.pj, self.pi])
        return sp.csr_matrix((np.concatenate([self.pw, self.pw]), (rows, cols)), shape=(n, n))

    def penalty(self, selected: np.ndarray) -> float:
        """Sum of w * R[i, j] over penalised pairs with both ends selected."""
        mask = np.zeros(self.n_features, dtype=bool)
        mask[np.asarray(selected, dtype=np.int64)] = True
        return float(self.pw[mask[self.pi] & mask[self.pj]].sum())

    def topm_value(self, selected: np.ndarray) -> float:
        """alpha * sum over classes of the m largest A among `selected` (the value without distinctness)."""
        a = self.A[np.asarray(selected, dtype=np.int64)]
        top = -np.partition(-a, self.m - 1, axis=0)[: self.m]
        return self.alpha * float(top.sum())


def build_problem(A: np.ndarray, R: np.ndarray, *, k: int, m: int, tau: float, w: float) -> Problem:
    """Collect the penalised pairs {i < j : R[i, j] >= tau, R[i, j] > 0} of the upper triangle of R, each costing
    w R[i, j] (the clique rule; the reference rule's pairs and penalties come from `threshold.reference_pairs`).

    R is read on its upper triangle only, as in the objective's sum over i < j, so the symmetric R of
    `similarity_R` and the reference's upper-triangular R (docs/method.md#qp) define the same problem. Pairs with R = 0
    cost nothing and are dropped.
    """
    iu, ju = np.triu_indices(A.shape[0], 1)
    r = R[iu, ju]
    keep = (r >= tau) & (r > 0) if w > 0 else np.zeros(r.shape, dtype=bool)
    return Problem(A=A, pi=iu[keep].astype(np.int64), pj=ju[keep].astype(np.int64),
                   pw=(w * r[keep]).astype(np.float64), k=k, m=m, tau=float(tau), w=float(w))


def objective(problem: Problem, selected: np.ndarray, assignment: Assignment) -> float:
    """The QPM objective of an answer, recomputed from scratch in float64.

    Args:
        problem: the instance.
        selected: (k,) selected feature indices.
        assignment: C tuples of feature indices (class order).

    Returns:
        alpha * sum_c sum_{f in assignment[c]} A[f, c] - penalty(selected).
    """
    rows = np.fromiter((f for fs in assignment for f in fs), dtype=np.int64)
    cols = np.repeat(np.arange(len(assignment)), [len(fs) for fs in assignment])
    return problem.alpha * float(problem.A[rows, cols].sum()) - problem.penalty(selected)


def top_m_assignment(problem: Problem, selected: np.ndarray) -> Assignment:
    """Per class the m selected features with the largest A (ties: lower feature index first)."""
    sel = np.sort(np.asarray(selected, dtype=np.int64))
    a = problem.A[sel]  # (k, C)
    order = np.argsort(-a, axis=0, kind="stable")[: problem.m]  # stable on sorted `sel`: lower index wins ties
    chosen = np.sort(sel[order], axis=0)  # (m, C)
    return [tuple(int(f) for f in chosen[:, c]) for c in range(problem.n_classes)]


def duplicate_groups(assignment: Assignment) -> dict[tuple[int, ...], list[int]]:
    """Feature sets used by two or more classes, mapped to those classes (ascending)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for c, fs in enumerate(assignment):
        groups.setdefault(fs, []).append(c)
    return {fs: cs for fs, cs in groups.items() if len(cs) > 1}


def unused_features(selected: np.ndarray, assignment: Assignment) -> list[int]:
    """Selected features that no class uses (ascending); the exact model allows none (s_f <= sum_c X[f, c])."""
    used = {int(f) for fs in assignment for f in fs}
    return sorted(int(f) for f in np.asarray(selected).ravel() if int(f) not in used)


def input_sha256(A: np.ndarray, R: np.ndarray) -> str:
    """sha256 over the shapes and the float64 little-endian bytes of A and R (the matrices the solve used)."""
    h = hashlib.sha256()
    for name, arr in (("A", A), ("R", R)):
        a = np.ascontiguousarray(arr, dtype="<f8")
        h.update(f"{name}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
