"""A semidefinite bound on the inner k-subset problem of the subset-Lagrangian bound, for dense penalty graphs.

The inner problem of `subset_bound` at class prices u is

    max over binary s with sum s = k of   g . s  -  sum_{penalised pairs (i, j)} pw_ij s_i s_j.

Its LP (pair rows y_ij >= s_i + s_j - 1, clique cuts) pays no penalty at s <= 1/2, which on dense penalty graphs
leaves the bound far above the inner optimum (measured on the CUB-size instance with 15 % of the pairs penalised, at
the same prices: LP with clique cuts 337.0, HiGHS's branch and bound after 120 s 335.4, this relaxation 321.9, best
known inner answer 319.0; benchmarks/qp_research/qp_results.md). Here s s^T is lifted to a matrix instead:

    Z = [[1, s^T], [s, Y]] positive semidefinite,  diag(Y) = s,  sum s = k,
    Y 1 = k s               (each row of s s^T sums to k s_i when sum s = k),
    Y >= 0                  (every pair; a doubly nonnegative relaxation),

maximising g . s - sum pw_ij Y_ij. Every k-subset is a feasible Z (Z = [1; s][1; s]^T) with the same value, so the
relaxation's maximum bounds the inner maximum; docs/method.md#qp. SCS (a first-order conic solver, one of cvxpy's
own dependencies) solves it to a loose tolerance in seconds at F = 512, and warm-starts when only g changes.

The bound is not SCS's objective: for ANY dual values (equality rows y, rows Y_ij >= 0: eta >= 0) weak duality gives

    max  <=  y . b  -  (1 + k) * lambda_min(C + A_eq^T y + A_pair^T eta),

because tr(Z) = 1 + sum s = 1 + k on the feasible set (C: the objective's cost matrix in SCS's minimisation form).
One eigendecomposition of the (F + 1) x (F + 1) matrix makes the certificate exact for whatever iterate the solver
stopped at, so neither its tolerance nor a time limit can make the bound invalid, only looser.

The same lift with the class part kept instead of priced (too slow for `solve_qp`) measures the floor that no price
steps can go below: benchmarks/qp_research/joint_bound.py.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from toolkit.qp.problem import Problem

# Largest F for the lifted relaxation. One eigendecomposition per SCS iteration costs O(F^3); measured on 2 cores
# (one cold and one warm solve): F = 512 3-4 s / 1.5-3 s, 768 14 s / 4 s, 1024 29 s / 8.5 s with 2 GB (about 9 s of
# it SCS's setup, which its time limit does not cover), too slow for a 60 s budget.
MAX_FEATURES = 768
SDP_EPS = 1e-3  # SCS's tolerance for price steps: at CUB size (15 % of pairs) 4 s cold, certified 323.5
TIGHT_EPS = 1e-4  # for the last solve at the best prices: 21 s more from there, certified 321.9 (same prices)
_SOLVE_CAP = 20.0  # seconds one solve may take at most (SCS fixes its limit when built; see `solve`)
_REBUILD = 0.7  # rebuild the solver when less than this share of its time limit is left
_R2 = float(np.sqrt(2.0))


class InnerSDP:
    """The lifted inner relaxation of one problem, built once; each `solve` changes only the scores g.

    Variables are SCS's scaled lower triangle of Z (column-major, off-diagonal entries times sqrt(2)).
    """

    def __init__(self, problem: Problem) -> None:
        import scs

        n, k = problem.n_features, problem.k
        d = n + 1
        self.n, self.k, self.d = n, k, d
        n_var = d * (d + 1) // 2
        ar = np.arange(1, d)
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        b: list[float] = []

        def add(r: np.ndarray, c: np.ndarray, v: np.ndarray) -> None:
            rows.append(np.asarray(r, dtype=np.int64))
            cols.append(np.asarray(c, dtype=np.int64))
            vals.append(np.asarray(v, dtype=np.float64))

        # Equality rows (SCS's zero cone).
        add(np.zeros(1), np.array([self._idx(0, 0)]), np.ones(1))  # Z_00 = 1
        b.append(1.0)
        add(ar, self._idx(ar, ar), np.ones(n))  # Y_ii - s_i = 0
        add(ar, self._idx(ar, 0), np.full(n, -1.0 / _R2))
        b += [0.0] * n
        add(np.full(n, 1 + n), self._idx(ar, 0), np.full(n, 1.0 / _R2))  # sum s = k
        b.append(float(k))
        ii, jj = np.meshgrid(ar, ar, indexing="ij")
        ii, jj = ii.ravel(), jj.ravel()
        add(1 + n + ii, self._idx(ii, jj), np.where(ii == jj, 1.0, 1.0 / _R2))  # sum_j Y_ij - k s_i = 0
        add(1 + n + ar, self._idx(ar, 0), np.full(n, -k / _R2))
        b += [0.0] * n
        n_eq = 2 + 2 * n
        # Rows Y_ij >= 0 on every pair, not only the penalised ones (SCS's nonnegative cone: s = b - A x >= 0 with
        # A = -Y_ij, b = 0). Measured at the CUB clique rule's prices: 333.50 against 334.03 with the penalised pairs
        # only, at about the same time per solve (9.8 s against 9.1 s at tolerance 1e-4).
        iu, ju = np.triu_indices(n, 1)
        n_pair = len(iu)
        add(n_eq + np.arange(n_pair), self._idx(iu + 1, ju + 1), np.full(n_pair, -1.0 / _R2))
        b += [0.0] * n_pair
        pair_idx = self._idx(problem.pi + 1, problem.pj + 1)
        # Z itself in the PSD cone (s = -A x = x).
        add(n_eq + n_pair + np.arange(n_var), np.arange(n_var), -np.ones(n_var))
        b += [0.0] * n_var
        a = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n_eq + n_pair + n_var, n_var))
        self.b = np.asarray(b)
        self.n_eq, self.n_pair = n_eq, n_pair
        self.a_eq, self.a_pair = a[:n_eq], a[n_eq:n_eq + n_pair]
        self.s_idx = self._idx(ar, 0)
        self.c = np.zeros(n_var)
        np.add.at(self.c, pair_idx, problem.pw / _R2)  # + pw_ij Y_ij (minimisation form)
        self._scs_module, self._a = scs, a
        self._solver, self._limit, self._eps, self._last = None, 0.0, SDP_EPS, None
        # Positions of the scaled lower triangle, to rebuild a symmetric matrix from its vector.
        self._tri_j = np.repeat(np.arange(d), d - np.arange(d))
        self._tri_i = np.concatenate([np.arange(j, d) for j in range(d)])

    def _idx(self, i: np.ndarray | int, j: np.ndarray | int) -> np.ndarray:
        """Position of Z[i, j] (either triangle) in SCS's column-major scaled lower triangle."""
        i, j = np.maximum(i, j), np.minimum(i, j)
        return j * self.d - j * (j - 1) // 2 + (i - j)

    def cost(self, g: np.ndarray) -> np.ndarray:
        """SCS's cost vector for scores g (F,): minimise -g.s + sum pw_ij Y_ij."""
        c = self.c.copy()
        c[self.s_idx] = -np.asarray(g, dtype=np.float64) / _R2
        return c

    def certify(self, c: np.ndarray, y_eq: np.ndarray, y_pair: np.ndarray) -> float:
        """Upper bound of max -c.x over the relaxation from any dual values (y_pair is clipped to >= 0)."""
        slack = c + self.a_eq.T @ y_eq + self.a_pair.T @ np.maximum(y_pair, 0.0)
        return float(y_eq @ self.b[: self.n_eq]) - self.trace_term(slack)  # the pair rows' right-hand sides are 0

    def trace_term(self, slack: np.ndarray) -> float:
        """(1 + k) lambda_min of the symmetric matrix whose scaled lower triangle is `slack` (n_var,): the least
        value of <slack, Z> over PSD Z with tr Z = 1 + k, i.e. over every feasible Z."""
        m = np.zeros((self.d, self.d))
        m[self._tri_i, self._tri_j] = slack / np.where(self._tri_i == self._tri_j, 1.0, _R2)
        m[self._tri_j, self._tri_i] = m[self._tri_i, self._tri_j]
        return (1.0 + self.k) * float(np.linalg.eigvalsh(m)[0])

    def solve(self, g: np.ndarray, time_limit: float, eps: float = SDP_EPS) -> tuple[float, np.ndarray | None]:
        """Certified upper bound of the inner maximum for scores g (F,), and the relaxation's s (F,) in [0, 1].

        Warm-starts from the previous solve (measured at F = 512: 3-4 s cold, 1.5-3 s warm, each including a 0.6 s
        build when the solver is rebuilt). SCS fixes its time limit when it is built, so the solver is built with at
        most `_SOLVE_CAP` seconds and rebuilt (warm-started) when `eps` changes or less than `_REBUILD` of its limit
        is left: a solve can then overrun `time_limit` by at most 1 / _REBUILD - 1 of it (only if SCS does not
        converge first), and the 0.6 s build is not paid at every step near the end. An iterate stopped by the limit
        still gives a valid, only looser, bound.

        Returns:
            (bound, s), or (inf, None) if SCS returned no finite point.
        """
        c = self.cost(g)
        limit = float(min(max(time_limit, 0.05), _SOLVE_CAP))
        if self._solver is None or limit < _REBUILD * self._limit or eps != self._eps:
            self._solver = self._scs_module.SCS(
                {"A": self._a, "b": self.b, "c": c}, {"z": self.n_eq, "l": self.n_pair, "s": [self.d]},
                eps_abs=eps, eps_rel=eps, time_limit_secs=limit, verbose=False)
            self._limit, self._eps = limit, eps
        else:
            self._solver.update(c=c)
        if self._last is None:
            sol = self._solver.solve(warm_start=False)
        else:
            sol = self._solver.solve(True, *self._last)
        self._last = (sol["x"], sol["y"], sol["s"])
        x, y = np.asarray(sol["x"]), np.asarray(sol["y"])
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            self._last = None  # do not warm-start from a failed solve
            return float("inf"), None
        ub = self.certify(c, y[: self.n_eq], y[self.n_eq:self.n_eq + self.n_pair])
        return ub, np.clip(x[self.s_idx] / _R2, 0.0, 1.0)


def sdp_applies(problem: Problem) -> bool:
    """Whether the lifted relaxation fits the time budget: F at most MAX_FEATURES."""
    return problem.n_features <= MAX_FEATURES
