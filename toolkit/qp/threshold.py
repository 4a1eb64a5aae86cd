"""The redundancy threshold tau: the lowest similarity at which k pairwise-compatible features still exist.

The reference code (QPM, Norrenbrock et al., ICLR 2025; DINO-QPM, arXiv 2604.07166; docs/method.md#qp) lowers a
threshold from a Turan-density start in 100 steps and probes each with greedy clique heuristics on the "compatible"
graph (edge i-j iff R[i, j] < tau). We ask the same question more directly: bisection over the sorted distinct
values of R, probing each candidate with a greedy independent-set search on the *conflict* graph (R >= tau) -- the
complement view of the same clique. Like the reference this is a heuristic (maximum clique is NP-hard): the tau
found always admits the k-feature set returned with it (verified), but a slightly lower tau might admit one the
greedy misses.

Two deliberate differences from the reference, both documented in the toolkit docs:
* one scale throughout: tau is found and applied on R (the reference searches on R + R^T but compares R, so it
  penalises only pairs above twice its own threshold when R is symmetric);
* the target size is k (the reference hard-codes 50).

Result: every pair with R[i, j] >= tau is penalised; the returned set has zero penalty and seeds the heuristic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolkit.qp.problem import Problem


@dataclass(frozen=True, kw_only=True)
class Threshold:
    """tau and a set of k features that are pairwise below it (zero redundancy penalty)."""

    tau: float
    compatible: np.ndarray  # (k,) int64 feature indices, all pairwise R < tau
    probes: int  # candidate thresholds tested


def symmetric_upper(R: np.ndarray) -> np.ndarray:
    """(F, F) symmetric matrix from the upper triangle of R (diagonal 0), the form the objective reads."""
    up = np.triu(R, 1)
    return up + up.T


def greedy_compatible(conflict: np.ndarray, k: int) -> np.ndarray:
    """Greedy independent set in a conflict graph, smallest remaining conflict degree first, stopping at k.

    Args:
        conflict: (F, F) bool, symmetric, False diagonal; True = the two features are too similar.
        k: stop as soon as k features are found.

    Returns:
        (<= k,) int64 features with no conflict among them.
    """
    n = conflict.shape[0]
    alive = np.ones(n, dtype=bool)
    degree = conflict.sum(1).astype(np.int64)
    big = np.iinfo(np.int64).max
    chosen: list[int] = []
    while len(chosen) < k and alive.any():
        v = int(np.argmin(np.where(alive, degree, big)))
        chosen.append(v)
        removed = alive & conflict[v]
        removed[v] = True
        alive &= ~removed
        # Degrees count conflicts with still-alive features only, so the next pick sees the residual graph.
        degree -= conflict[removed].sum(0)
    return np.asarray(chosen, dtype=np.int64)


def _largest_compatible(rs: np.ndarray, tau: float, k: int) -> np.ndarray:
    conflict = rs >= tau
    np.fill_diagonal(conflict, False)
    best = greedy_compatible(conflict, k)
    if len(best) < k:
        # Second opinion: peel off the most-conflicted feature until no conflict is left (the reference's
        # max-degree idea); it sometimes keeps a larger set than the min-degree greedy.
        alive = np.ones(len(rs), dtype=bool)
        degree = conflict.sum(1).astype(np.int64)
        while degree[alive].max(initial=0) > 0:
            v = int(np.argmax(np.where(alive, degree, -1)))
            alive[v] = False
            degree -= conflict[v]
        peeled = np.flatnonzero(alive)[:k]
        if len(peeled) > len(best):
            best = peeled
    return best


def choose_tau(R: np.ndarray, k: int) -> Threshold:
    """Lowest tau (on the grid of R's distinct upper-triangle values) at which the greedy finds k compatible features.

    Args:
        R: (F, F) similarity; its upper triangle is used.
        k: number of features that must be pairwise compatible (R < tau).

    Returns:
        The threshold and the compatible set found at it. If every pair can be compatible only above the largest
        value of R, tau is set just above that value (then no pair is penalised).
    """
    rs = symmetric_upper(np.asarray(R, dtype=np.float64))
    n = rs.shape[0]
    if k <= 1 or n < 2:
        return Threshold(tau=float(np.nextafter(rs.max(initial=0.0), np.inf)), compatible=np.arange(k), probes=0)
    values = np.unique(rs[np.triu_indices(n, 1)])
    top = float(np.nextafter(values[-1], np.inf))  # above every value: no conflicts, any k features work
    lo, hi = 0, len(values)  # invariant: the candidate at index hi works (index len(values) means `top`)
    found = np.arange(k, dtype=np.int64)
    probes = 0
    while lo < hi:
        mid = (lo + hi) // 2
        got = _largest_compatible(rs, float(values[mid]), k)
        probes += 1
        if len(got) >= k:
            hi, found = mid, got[:k]
        else:
            lo = mid + 1
    tau = float(values[hi]) if hi < len(values) else top
    if hi == len(values):
        found = np.arange(k, dtype=np.int64)
    found = np.sort(found)
    sub = rs[np.ix_(found, found)]
    if (sub >= tau).any():  # cannot happen unless the greedy is wrong; cheap to check
        raise AssertionError("choose_tau: compatible set has a pair at or above tau")
    return Threshold(tau=tau, compatible=found, probes=probes)


@dataclass(frozen=True, kw_only=True)
class ReferencePairs:
    """The reference rule's penalised pairs: i < j with R[i, j] >= tau, each costing its min-max rescaled R."""

    tau: float
    compatible: np.ndarray  # (k,) int64 features pairwise below tau on the search scale (zero penalty)
    pi: np.ndarray  # (P,) int64, pi < pj
    pj: np.ndarray  # (P,) int64
    penalty: np.ndarray  # (P,) float64 in (0, 1]: (R - min nonzero R) / (max R - min nonzero R)
    probes: int

    def problem(self, A: np.ndarray, *, k: int, m: int, w: float) -> Problem:
        """The QPM instance of these pairs: each costs w x its rescaled penalty (none when w = 0)."""
        keep = slice(None) if w > 0 else slice(0, 0)
        return Problem(A=A, pi=self.pi[keep], pj=self.pj[keep], pw=w * self.penalty[keep], k=k, m=m, tau=self.tau,
                       w=w)


def reference_pairs(R: np.ndarray, k: int, tau: float | None = None) -> ReferencePairs:
    """The redundancy rule of RobertZimm/DINO-QPM, reproduced on purpose (docs/method.md#qp, "reference rule").

    The reference builds X = R + R^T (diagonal 0), finds its threshold on X, but then penalises the pairs i < j
    whose *R* is at or above it, with the coefficient (R - min nonzero R) / (max R - min nonzero R). For the
    symmetric R of DINO-QPM (cosines, negatives kept) X = 2R, so only pairs above twice the single-scale threshold
    are penalised. Here the threshold on X is found with `choose_tau` (bisection + greedy independent sets) instead
    of the reference's Turan-started clique heuristics; the question asked is the same.

    Args:
        R: (F, F) similarity, symmetric or upper-triangular; negative values are kept.
        k: features that must be pairwise compatible on X.
        tau: a fixed threshold (on R) instead of the search; the compatible set is then the search's anyway.

    Returns:
        The threshold, a zero-penalty start and the penalised pairs with their coefficients (pairs whose
        coefficient is 0, i.e. R equal to its smallest nonzero value, cost nothing and are dropped).
    """
    r = np.array(R, dtype=np.float64)
    np.fill_diagonal(r, 0.0)
    x = r + r.T
    th = choose_tau(x, k)
    t = th.tau if tau is None else float(tau)
    n = r.shape[0]
    iu, ju = np.triu_indices(n, 1)
    vals = r[iu, ju]
    nz = r[r != 0]
    lo = float(nz.min()) if nz.size else 0.0
    span = float(nz.max()) - lo if nz.size else 0.0
    keep = (vals >= t) & (vals != 0)
    coef = (vals[keep] - lo) / span if span > 0 else np.ones(int(keep.sum()))
    pos = coef > 0
    return ReferencePairs(tau=t, compatible=th.compatible, pi=iu[keep][pos].astype(np.int64),
                          pj=ju[keep][pos].astype(np.int64), penalty=coef[pos].astype(np.float64), probes=th.probes)
