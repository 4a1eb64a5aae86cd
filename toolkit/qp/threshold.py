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


def reference_tau(R: np.ndarray, k: int) -> Threshold:
    """The DINO-QPM code's effective threshold: the clique search runs on R + R^T (= 2 R for a symmetric R) but the
    penalised pairs are then found by comparing R with it, so tau = 2 x the clique threshold of R. The compatible set
    of the clique rule stays pairwise below it (zero penalty)."""
    th = choose_tau(R, k)
    return Threshold(tau=2.0 * th.tau, compatible=th.compatible, probes=th.probes)


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
