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

Dense penalty graphs (at least 2 % of the pairs penalised, e.g. the clique rule at CUB size): HiGHS's root
bound of the plain inner model stays far above the inner optimum, and each solve takes seconds. The inner model
then gets clique inequalities of the penalty graph (`clique_cut_rows`; valid for every binary s, so the inner
optimum is unchanged), which cut off the fractional points where the pair rows vanish, and the price steps run
first on the inner model's LP relaxation (a warm-started simplex; its bound is recomputed from the duals), then on
the lifted semidefinite relaxation of the inner problem from the best prices (`sdp_bound`; far stronger than the
LP or the MIP's root there), ending with one tighter solve at the best prices. Where the SDP does not fit (F above
`sdp_bound.MAX_FEATURES`), the MIP takes its place and the time left goes to one MIP solve at the best prices. Any
upper bound of the inner maximum (LP with valid cuts, the SDP's dual certificate, or the MIP's dual bound) keeps L
valid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from toolkit.qp.problem import Problem
from toolkit.qp.sdp_bound import SDP_EPS, TIGHT_EPS, InnerSDP, sdp_applies

_INNER_GAP = 1e-6  # relative MIP gap of the inner problem (what it leaves open adds to the bound)
_INNER_SECONDS = 10.0  # time limit of one inner solve (its proven bound is used even when it stops early)
_DENSE_SHARE = 0.02  # penalised share of all pairs from which the inner model gets clique cuts
_DENSE_INNER_SECONDS = 3.0  # inner time limit with clique cuts: the root (cuts included) gives nearly all the bound
_CLIQUE_MAX_A = 8  # clique cuts for a = 1 .. min(|Q| - 1, this)
_CLIQUE_MAX_ROWS = 4_000  # measured: more rows slow the inner LP (CUB q85: 5-12 s a step) more than they gain
_CLIQUE_PASSES = 3  # greedy clique passes (`penalty_cliques`)
_LP_SHARE = 0.6  # dense graphs: share of the subset bound's time for price steps on the inner LP relaxation
_LP_SHARE_SDP = 0.3  # the same when the SDP phase follows (its steps matter more: CUB q85, the SDP gives 323.5 at
# the LP phase's best prices and 319.8 after its own price steps)
_SDP_TIGHT_SHARE = 0.2  # of the SDP phase: the last solve, at the best prices and a tighter tolerance
_LP_STEP = 0.5  # first Polyak factor of the LP phase (1 overshoots: the incumbent is far below the bound there)
_MIP_STEP = 0.5  # Polyak factor when the MIP phase resumes from the LP phase's best prices
_OFFER_EVERY = 10  # LP phase: a rounded selection goes to `on_selection` at most every this many steps
_SAFETY = 1e-7  # relative margin added to the inner bound for HiGHS's feasibility tolerances
_STALL = 3  # iterations without a better bound before the step size shrinks
_LP_STALL = 2  # the same in the LP phase of dense graphs
_SHRINK = 0.6
_MIN_STEP = 1e-3  # Polyak factor below which the method has converged as far as it will


@dataclass(frozen=True, eq=False, kw_only=True)
class SubsetBound:
    """The best bound found, the prices that give it, and what the iterations did."""

    value: float  # valid upper bound on the full problem (inf if no inner solve finished its root)
    u: np.ndarray  # (C,) class prices of the best bound
    lam: np.ndarray  # (F,) link prices (>= 0) of the best bound
    iterations: int
    inner_seconds: float  # total time in the inner solves (HiGHS, SCS)
    phase: str  # which inner relaxation gave the best bound: "mip" (HiGHS branch and bound), "lp" or "sdp"
    sdp_solves: int  # inner solves of the lifted relaxation


def penalty_cliques(problem: Problem, priority: np.ndarray, passes: int = _CLIQUE_PASSES) -> list[np.ndarray]:
    """Cliques of the penalty graph (every two members form a penalised pair), at least 3 members each.

    One greedy clique per seed feature and pass: the seed, then its penalised neighbours in decreasing priority
    that are penalised with every member so far. Pass 0 uses `priority`; later passes multiply it by seeded random
    factors in [0.5, 1.5], which gives overlapping cliques (measured on the CUB q95 instance: the inner LP bound at
    fixed prices 347.40 with one pass, 346.68 with three). Duplicates are dropped.

    Args:
        problem: the instance.
        priority: (F,) feature scores (e.g. the Lagrangian's g); higher first, as seeds and as members.
        passes: greedy passes over all seeds.

    Returns:
        Sorted int64 member arrays.
    """
    n = problem.n_features
    adj = np.zeros((n, n), dtype=bool)
    adj[problem.pi, problem.pj] = True
    adj[problem.pj, problem.pi] = True
    rng = np.random.default_rng(0)
    seen: set[bytes] = set()
    out: list[np.ndarray] = []
    for k in range(passes):
        pr = priority if k == 0 else priority * rng.uniform(0.5, 1.5, n)
        for v in np.argsort(-pr, kind="stable"):
            nb = np.flatnonzero(adj[v])
            members = [int(v)]
            for c in nb[np.argsort(-pr[nb], kind="stable")]:
                if adj[c, members].all():
                    members.append(int(c))
            if len(members) >= 3:
                q = np.sort(np.asarray(members, dtype=np.int64))
                if q.tobytes() not in seen:
                    seen.add(q.tobytes())
                    out.append(q)
    return out


def clique_cut_rows(problem: Problem, cliques: list[np.ndarray],
                    max_rows: int = _CLIQUE_MAX_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clique inequalities  sum_{p in Q} y_p - a sum_{f in Q} s_f >= -a (a + 1) / 2  for a = 1 .. |Q| - 1 (capped).

    Valid for every binary s with y_p = s_i s_j: with t = |S cap Q| the left side is t (t - 1) / 2 - a t, and
    t (t - 1) / 2 - a t + a (a + 1) / 2 = (t - a) (t - a - 1) / 2 >= 0 for integers t, a. They leave the binary
    optimum unchanged (y = s_i s_j satisfies them) but cut off the fractional points at which the pair rows
    y_p >= s_i + s_j - 1 vanish (s = 1/2 on a clique), which is what makes the plain LP of the penalty weak.

    Returns:
        (row, column, value, lower) in the inner model's column numbering (s_f = f, y_p = F + p); row r has lower
        bound lower[r].
    """
    n = problem.n_features
    key = problem.pi * n + problem.pj
    by_key = np.argsort(key, kind="stable")  # pair ids by (i, j), whatever order the problem lists them in
    rows, cols, vals, lower = [], [], [], []
    r = 0
    for q in cliques:
        ii, jj = np.triu_indices(len(q), 1)
        pid = by_key[np.searchsorted(key[by_key], q[ii] * n + q[jj])]
        for a in range(1, min(len(q) - 1, _CLIQUE_MAX_A) + 1):
            if r >= max_rows:
                break
            rows.append(np.full(len(q) + len(pid), r))
            cols.append(np.concatenate([q, n + pid]))
            vals.append(np.concatenate([np.full(len(q), -float(a)), np.ones(len(pid))]))
            lower.append(-a * (a + 1) / 2.0)
            r += 1
    if not rows:
        e = np.zeros(0)
        return e.astype(np.int64), e.astype(np.int64), e, e
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), np.asarray(lower)


class _Inner:
    """max g.s - sum_p pw_p y_p  s.t.  sum s = k,  s_i + s_j - y_p <= 1,  s binary,  y in [0, 1]  (HiGHS model),
    plus clique cuts (`clique_cut_rows`) when given.

    Built once; each solve only changes the costs of s and passes the previous selection as a MIP start.
    """

    def __init__(self, problem: Problem, cliques: list[np.ndarray] | None = None) -> None:
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
        self.n_cuts = 0
        mat_r, mat_c, mat_v = rows, cols, vals
        row_lo, row_hi = np.asarray(lp.row_lower_, dtype=np.float64), np.asarray(lp.row_upper_, dtype=np.float64)
        if cliques:
            cr, cc, cv, lo = clique_cut_rows(problem, cliques)
            if len(lo):
                order = np.lexsort((cc, cr))
                cr, cc, cv = cr[order], cc[order], cv[order]
                starts = np.searchsorted(cr, np.arange(len(lo))).astype(np.int32)
                h.addRows(len(lo), lo, np.full(len(lo), highspy.kHighsInf), len(cc), starts,
                          cc.astype(np.int32), cv)
                self.n_cuts = len(lo)
                mat_r = np.concatenate([rows, 1 + n_p + cr])
                mat_c, mat_v = np.concatenate([cols, cc]), np.concatenate([vals, cv])
                row_lo = np.concatenate([row_lo, lo])
                row_hi = np.concatenate([row_hi, np.full(len(lo), np.inf)])
        # The same rows in scipy form, for a bound recomputed from the LP's duals (`lp_solve`).
        self.mat = sp.csr_matrix((mat_v, (mat_r, mat_c)), shape=(len(row_lo), n + n_p))
        self.row_lo, self.row_hi = row_lo, row_hi
        self.cost_y = -problem.pw
        self.h = h
        self.cols = np.arange(n, dtype=np.int32)
        self.relaxed = False

    def _set_integrality(self, relaxed: bool) -> None:
        if relaxed != self.relaxed:
            kind = self.hs.HighsVarType.kContinuous if relaxed else self.hs.HighsVarType.kInteger
            self.h.changeColsIntegrality(self.n, self.cols, np.array([kind] * self.n))
            self.relaxed = relaxed

    def lp_solve(self, g: np.ndarray, time_limit: float) -> tuple[float, np.ndarray | None]:
        """(valid upper bound of the inner maximum or inf, optimal fractional s (F,) or None): the LP relaxation.

        The simplex warm-starts from the previous basis (only the costs of s change between calls). The bound is
        recomputed from the row duals y, so it does not rest on the solver's tolerances: for any y,
        c.x = y.(A x) + (c - A^T y).x <= sum_r (y_r hi_r if y_r > 0 else y_r lo_r) + sum_j max(c - A^T y, 0)_j
        over 0 <= x <= 1; the smaller of the values for y and -y is used (either sign convention).
        """
        h = self.h
        self._set_integrality(True)
        c = np.concatenate([np.asarray(g, dtype=np.float64), self.cost_y])
        h.changeColsCost(self.n, self.cols, c[: self.n])
        # The LP's time limit counts the object's run time over all calls (measured with HiGHS 1.16; the MIP's
        # counts from its own start).
        h.setOptionValue("time_limit", h.getRunTime() + max(float(time_limit), 0.05))
        h.run()
        if h.getModelStatus() != self.hs.HighsModelStatus.kOptimal:
            return float("inf"), None
        sol = h.getSolution()
        y0 = np.asarray(sol.row_dual, dtype=np.float64)
        best = float("inf")
        for y in (y0, -y0):
            y = np.where((y > 0) & ~np.isfinite(self.row_hi), 0.0, y)
            y = np.where((y < 0) & ~np.isfinite(self.row_lo), 0.0, y)
            rhs = np.where(y > 0, y * np.where(np.isfinite(self.row_hi), self.row_hi, 0.0),
                           y * np.where(np.isfinite(self.row_lo), self.row_lo, 0.0)).sum()
            best = min(best, float(rhs + np.maximum(c - self.mat.T @ y, 0.0).sum()))
        return best, np.clip(np.asarray(sol.col_value[: self.n]), 0.0, 1.0)

    def solve(self, g: np.ndarray, start: np.ndarray | None, time_limit: float) -> tuple[float, np.ndarray | None]:
        """(proven upper bound of the inner maximum or inf, best selection found or None) for scores g (F,)."""
        h = self.h
        self._set_integrality(False)
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
    u = np.asarray(u0, dtype=np.float64).copy()
    lam_f = np.zeros(p.n_features)
    n_all = p.n_features * (p.n_features - 1) // 2
    dense = len(p.pw) >= _DENSE_SHARE * max(n_all, 1)
    # Dense penalty graphs: HiGHS's root bound of the plain inner model stays far above its optimum (measured at
    # fixed prices on the CUB q95 instance: 349.8 after 10 s, 348.0 after 180 s, incumbent 345.8); with clique cuts
    # the inner LP alone gives 347.4 in 0.1 s (346.7 with three clique passes), so many more price steps fit.
    cliques = penalty_cliques(p, np.maximum(aa - u, 0.0).sum(1)) if dense else None
    inner = _Inner(p, cliques)
    # Dense graphs where it fits: after the LP phase, the price steps run on the lifted (semidefinite) relaxation
    # of the inner problem, far stronger there than the LP or HiGHS's branch and bound (sdp_bound).
    sdp = InnerSDP(p) if dense and sdp_applies(p) else None
    inner_limit = _DENSE_INNER_SECONDS if dense else _INNER_SECONDS
    best, best_u, best_lam, best_phase, sdp_solves = float("inf"), u.copy(), lam_f.copy(), "mip", 0
    lam, stall, it, spent, last_offer = (_LP_STEP if dense else 1.0), 0, 0, 0.0, -_OFFER_EVERY
    seen: set[bytes] = set()
    sel = None if start is None else np.sort(np.asarray(start, dtype=np.int64))
    # Dense graphs start with the LP relaxation of the inner model (cuts included): a warm-started simplex that
    # takes 0.1-2 s where the MIP's root takes 2-10 s, so the prices converge; then the SDP (or, where it does not
    # fit, the MIP) from the best prices.
    mode = "lp" if dense else "mip"
    lp_end = time.perf_counter() + (_LP_SHARE_SDP if sdp else _LP_SHARE) * max(deadline - time.perf_counter(), 0.0)
    final, sdp_end = False, math.inf
    while it < max_iterations and time.perf_counter() < deadline and best > target:
        now = time.perf_counter()
        if lam <= _MIN_STEP or (mode == "lp" and now >= lp_end) or (mode == "sdp" and now >= sdp_end):
            if mode == "sdp":
                # The steps have converged (or their time is up): one solve at a tighter tolerance at the best
                # prices, warm-started, with the time left (CUB q85: 1.6 units lower there, 323.5 -> 321.9).
                final, u, lam_f, sdp_end = True, best_u.copy(), best_lam.copy(), math.inf
            elif mode == "mip":
                if final or not dense:
                    break  # converged as far as the step size allows
                # Dense: the steps have converged; the time left goes to one MIP solve at the best prices, whose
                # branch and bound can only lower the bound there.
                final, u, lam_f, inner_limit = True, best_u.copy(), best_lam.copy(), deadline - time.perf_counter()
            else:
                mode = "sdp" if sdp is not None else "mip"
                u, lam_f, lam, stall = best_u.copy(), best_lam.copy(), _MIP_STEP, 0
                sdp_end = deadline - _SDP_TIGHT_SHARE * max(deadline - now, 0.0) if sdp is not None else math.inf
        over = aa - u + lam_f[:, None]  # (F, C)
        g = np.maximum(over, 0.0).sum(1) - lam_f
        t = time.perf_counter()
        if mode == "lp":
            ub, weights = inner.lp_solve(g, deadline - t)
        elif mode == "sdp":
            assert sdp is not None
            ub, weights = sdp.solve(g, deadline - t, eps=TIGHT_EPS if final else SDP_EPS)
            sdp_solves += 1
        if mode != "mip":  # a fractional s: its k largest entries are the selection handed on
            found = None if weights is None else np.sort(np.argsort(-weights)[: p.k]).astype(np.int64)
        else:
            ub, found = inner.solve(g, sel, min(inner_limit, deadline - t))
            weights = None
            if found is not None:
                weights = np.zeros(p.n_features)
                weights[found] = 1.0
            if dense and (found is None or ub >= np.sort(g)[-p.k:].sum() - 1e-9):
                # Stopped before its root LP (or any incumbent): no information. Give the next solve more time at
                # the same prices, with this selection (if any) as its start.
                inner_limit *= 2.0
                sel = sel if found is None else found
                spent += time.perf_counter() - t
                continue
        spent += time.perf_counter() - t
        it += 1
        value = p.m * float(u.sum()) + ub + _SAFETY * (abs(ub) + 1.0)
        if final:
            if value < best:
                best, best_phase = value, mode
            if found is not None and on_selection is not None and found.tobytes() not in seen:
                on_selection(found)
            break
        if value < best:
            best, best_u, best_lam, best_phase, stall = value, u.copy(), lam_f.copy(), mode, 0
        else:
            stall += 1
            if stall >= (_LP_STALL if mode != "mip" else _STALL):
                lam, stall = lam * _SHRINK, 0
        if found is None or weights is None:
            break  # no selection, no subgradient (the inner solve ran out of time before any incumbent)
        sel = found  # the next MIP start (in the LP phase: the rounded LP optimum)
        key = found.tobytes()
        if on_selection is not None and key not in seen and (mode != "lp" or it - last_offer >= _OFFER_EVERY):
            seen.add(key)
            last_offer = it
            incumbent = max(incumbent, on_selection(found))
        # Subgradients of L at the inner optimum s (fractional in the LP phase): for u_c, m minus the s-weighted
        # count of features that beat the class's price; for lam_f, s_f times (how many classes would take f
        # minus 1), projected onto lam >= 0.
        act = np.flatnonzero(weights > 1e-9)
        hit = (over[act] > 0) * weights[act, None]  # (|act|, C)
        sg_u = p.m - hit.sum(0)
        sg_l = np.zeros(p.n_features)
        sg_l[act] = hit.sum(1) - weights[act]
        sg_l[(lam_f <= 0) & (sg_l > 0)] = 0.0  # lam cannot go below 0
        norm = float((sg_u**2).sum() + (sg_l**2).sum())
        if norm == 0.0:
            if mode == "lp":
                lp_end = 0.0  # the LP relaxation is exhausted at these prices: go on with the SDP (or the MIP)
                continue
            break  # every dualised row holds with equality: L is the optimum of the relaxation
        step = lam * max(value - incumbent, 0.0) / norm
        u = u - step * sg_u
        lam_f = np.maximum(lam_f - step * sg_l, 0.0)
    return SubsetBound(value=best, u=best_u, lam=best_lam, iterations=it, inner_seconds=spent, phase=best_phase,
                       sdp_solves=sdp_solves)
