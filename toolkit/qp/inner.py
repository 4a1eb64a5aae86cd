"""The inner problem of the subset-Lagrangian bound as a HiGHS model, with clique cuts on dense penalty graphs.

At class prices u (and link prices lam) the inner problem of `subset_bound` is

    max over binary s with sum s = k of   g . s  -  sum_{penalised pairs (i, j)} pw_ij s_i s_j,

here linearised with one column y_p per penalised pair (y_p >= s_i + s_j - 1). `InnerModel` is built once and
re-solved at each price step with new costs: by branch and bound (`solve`: HiGHS's proven bound, valid also when it
stops at its time limit) or as an LP (`lp_solve`: a warm-started simplex, its bound recomputed from the duals). On
dense penalty graphs the plain LP vanishes at s = 1/2, so the model gets clique inequalities of the penalty graph
(`penalty_cliques`, `clique_cut_rows`): valid for every binary s, they leave the inner optimum unchanged and cut off
those fractional points.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from toolkit.qp.problem import Problem

_INNER_GAP = 1e-6  # relative MIP gap of the inner problem (what it leaves open adds to the bound)
_CLIQUE_MAX_A = 8  # clique cuts for a = 1 .. min(|Q| - 1, this)
_CLIQUE_MAX_ROWS = 4_000  # measured: more rows slow the inner LP (CUB q85: 5-12 s a step) more than they gain
_CLIQUE_PASSES = 3  # greedy clique passes (`penalty_cliques`)


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


class InnerModel:
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
