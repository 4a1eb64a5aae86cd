"""A stronger certified bound: dualise only the class rows and keep the redundancy penalty exact.

The LP of the penalty (y_ij >= s_i + s_j - 1) vanishes at fractional s, so every LP-based bound (`bound.py`, the
MILP's root) spreads s over many features and pays almost no penalty (docs/method.md#qp). Here only the class rows
sum_f X[f, c] = m (prices u) and the unused-feature links s_f <= sum_c X[f, c] (prices lam >= 0) are dualised; what
is left is, for EVERY u in R^C and lam in R^F_+,

    L(u, lam)   = m * sum_c u_c + max_{|S| = k} ( g(S) - penalty(S) ),
    g_f(u, lam) = sum_c max(alpha A[f, c] - u_c + lam_f, 0) - lam_f,

an upper bound on the full problem (weak duality; distinctness is dropped, which only removes constraints). The
inner problem is a k-subset problem with the exact pairwise penalty: F binaries and one linearised pair row per
penalised pair, no (F C) block, so HiGHS solves it by branch and bound in about a second at CUB size. Its Lagrangian
dual is as strong as the penalty convexified over k-subsets, not over the unit box.

We certify HiGHS's proven upper bound of the inner problem (valid also when it stops at its time limit), never its
incumbent, and lower L by Polyak subgradient steps on u from the LP-optimal prices of `bound.dual_bound`. The inner
optimum S of each step is also a good selection, handed back for the local search (the primal side).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from toolkit.qp.problem import Problem

_INNER_GAP = 1e-6  # relative MIP gap of the inner problem (what it leaves open adds to the bound)
_INNER_SECONDS = 10.0  # time limit of one inner solve (its proven bound is used even when it stops early)
_SAFETY = 1e-7  # relative margin added to the inner bound for HiGHS's feasibility tolerances
_STALL = 3  # iterations without a better bound before the step size shrinks
_SHRINK = 0.6
_MIN_STEP = 1e-3  # Polyak factor below which the method has converged as far as it will


@dataclass(frozen=True, eq=False, kw_only=True)
class SubsetBound:
    """The best bound found, the prices that give it, and what the iterations did."""

    value: float  # valid upper bound on the full problem (inf if no inner solve finished its root)
    u: np.ndarray  # (C,) class prices of the best bound
    lam: np.ndarray  # (F,) link prices (>= 0) of the best bound
    iterations: int
    inner_seconds: float  # total time in HiGHS


class _Inner:
    """max g.s - sum_p pw_p y_p  s.t.  sum s = k,  s_i + s_j - y_p <= 1,  s binary,  y in [0, 1]  (HiGHS model).

    Built once; each solve only changes the costs of s and passes the previous selection as a MIP start.
    """

    def __init__(self, problem: Problem) -> None:
        import highspy

        self.hs = highspy
        n, n_p = problem.n_features, len(problem.pw)
        self.n, self.k = n, problem.k
        self.pi, self.pj = problem.pi, problem.pj
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("mip_rel_gap", _INNER_GAP)
        h.setOptionValue("random_seed", 0)
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = n + n_p, 1 + n_p
        lp.col_cost_ = np.concatenate([np.zeros(n), -problem.pw])
        lp.col_lower_ = np.zeros(n + n_p)
        lp.col_upper_ = np.ones(n + n_p)
        lp.row_lower_ = np.concatenate([[float(problem.k)], np.full(n_p, -highspy.kHighsInf)])
        lp.row_upper_ = np.concatenate([[float(problem.k)], np.ones(n_p)])
        # Column-wise matrix: s_f is in the cardinality row 0 and in the pair rows containing f; y_p only in row p+1.
        pairs = np.arange(n_p)
        rows = np.concatenate([np.zeros(n, dtype=np.int64), 1 + pairs, 1 + pairs, 1 + pairs])
        cols = np.concatenate([np.arange(n), problem.pi, problem.pj, n + pairs])
        vals = np.concatenate([np.ones(n), np.ones(n_p), np.ones(n_p), -np.ones(n_p)])
        order = np.lexsort((rows, cols))
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.searchsorted(cols[order], np.arange(n + n_p + 1)).astype(np.int32)
        lp.a_matrix_.index_ = rows[order].astype(np.int32)
        lp.a_matrix_.value_ = vals[order]
        lp.sense_ = highspy.ObjSense.kMaximize
        lp.integrality_ = [highspy.HighsVarType.kInteger] * n + [highspy.HighsVarType.kContinuous] * n_p
        h.passModel(lp)
        self.h = h
        self.cols = np.arange(n, dtype=np.int32)

    def solve(self, g: np.ndarray, start: np.ndarray | None, time_limit: float) -> tuple[float, np.ndarray | None]:
        """(proven upper bound of the inner maximum or inf, best selection found or None) for scores g (F,)."""
        h = self.h
        h.changeColsCost(self.n, self.cols, np.asarray(g, dtype=np.float64))
        h.setOptionValue("time_limit", max(float(time_limit), 0.05))
        if start is not None:
            s = np.zeros(self.n)
            s[start] = 1.0
            sol = self.hs.HighsSolution()
            sol.col_value = np.concatenate([s, s[self.pi] * s[self.pj]])
            sol.value_valid = True
            h.setSolution(sol)
        h.run()
        info = h.getInfo()
        ub = float(info.mip_dual_bound)
        if not np.isfinite(ub) or info.primal_solution_status != 2:  # 2 = kSolutionStatusFeasible
            return (ub if np.isfinite(ub) else float("inf")), None
        x = np.asarray(h.getSolution().col_value[: self.n])
        sel = np.sort(np.argsort(-x)[: self.k]).astype(np.int64)
        return ub, sel


def subset_bound(problem: Problem, u0: np.ndarray, deadline: float, *, incumbent: float, target: float,
                 start: np.ndarray | None = None, max_iterations: int = 10**9,
                 on_selection: Callable[[np.ndarray], float] | None = None) -> SubsetBound:
    """Minimise L(u) by Polyak subgradient steps until `deadline`, convergence, or L <= `target`.

    Args:
        problem: the instance.
        u0: (C,) starting class prices (the LP-optimal ones of `bound.dual_bound`).
        deadline: `time.perf_counter()` value after which no new inner solve starts.
        incumbent: value of the best known answer (the Polyak target level; raised by `on_selection`).
        target: stop once the bound is at or below this (nothing left to prove).
        start: (k,) a selection used as the first MIP start of the inner problem.
        max_iterations: upper limit on inner solves (1: just L(u0)).
        on_selection: called with each new inner selection; returns the value of the best answer known after it
            (e.g. after a local search from that selection), which sharpens the step size.

    Returns:
        The smallest L(u, lam) proven, with its prices.
    """
    p = problem
    aa = p.alpha * p.A
    inner = _Inner(p)
    u = np.asarray(u0, dtype=np.float64).copy()
    lam_f = np.zeros(p.n_features)
    best, best_u, best_lam = float("inf"), u.copy(), lam_f.copy()
    lam, stall, it, spent = 1.0, 0, 0, 0.0
    seen: set[bytes] = set()
    sel = None if start is None else np.sort(np.asarray(start, dtype=np.int64))
    while it < max_iterations and time.perf_counter() < deadline and best > target and lam > _MIN_STEP:
        over = aa - u + lam_f[:, None]  # (F, C)
        g = np.maximum(over, 0.0).sum(1) - lam_f
        t = time.perf_counter()
        ub, found = inner.solve(g, sel, min(_INNER_SECONDS, deadline - t))
        spent += time.perf_counter() - t
        it += 1
        value = p.m * float(u.sum()) + ub + _SAFETY * (abs(ub) + 1.0)
        if value < best:
            best, best_u, best_lam, stall = value, u.copy(), lam_f.copy(), 0
        else:
            stall += 1
            if stall >= _STALL:
                lam, stall = lam * _SHRINK, 0
        if found is None:
            break  # no selection, no subgradient (the inner solve ran out of time before any incumbent)
        sel = found
        key = sel.tobytes()
        if on_selection is not None and key not in seen:
            seen.add(key)
            incumbent = max(incumbent, on_selection(sel))
        # Subgradients of L: for u_c, m minus how many selected features beat the class's price; for lam_f
        # (selected f only), how many classes would take f minus 1 (projected onto lam >= 0).
        hit = over[sel] > 0  # (k, C)
        sg_u = (p.m - hit.sum(0)).astype(np.float64)
        sg_l = np.zeros(p.n_features)
        sg_l[sel] = hit.sum(1) - 1.0
        sg_l[(lam_f <= 0) & (sg_l > 0)] = 0.0  # lam cannot go below 0
        norm = float((sg_u**2).sum() + (sg_l**2).sum())
        if norm == 0.0:
            break  # every dualised row holds with equality: L is the optimum of the relaxation
        step = lam * max(value - incumbent, 0.0) / norm
        u = u - step * sg_u
        lam_f = np.maximum(lam_f - step * sg_l, 0.0)
    return SubsetBound(value=best, u=best_u, lam=best_lam, iterations=it, inner_seconds=spent)
