"""The floor of the subset bound on dense penalty graphs: the lifted relaxation with the class part kept (research).

`toolkit.qp.subset_bound` prices the class rows and, on dense penalty graphs, bounds its inner k-subset problem by
the lifted semidefinite relaxation `toolkit.qp.sdp_bound.InnerSDP`. `joint_bound` solves the same lift with the class
part kept as an LP instead of priced. By Lagrangian duality its maximum is the lowest bound the price steps can reach
at any prices, so it says how far the product's certificate is from what its relaxation can prove. One solve takes
1.5-3 minutes at CUB size on 2 cores: far too slow for `solve_qp`, which never calls it. Used by `qp_floor.py` and by
tests/test_qp_research.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from toolkit.qp.problem import Problem
from toolkit.qp.sdp_bound import TIGHT_EPS, InnerSDP

_R2 = float(np.sqrt(2.0))  # SCS scales the off-diagonal entries of a PSD variable by sqrt(2) (as in InnerSDP)


@dataclass(frozen=True, kw_only=True)
class JointBound:
    """The floor of the subset bound's price steps (`joint_bound`)."""

    value: float  # certified upper bound of the full problem with the fixings (inf if SCS returned no finite point)
    s: np.ndarray  # (F,) the relaxation's selection in [0, 1] (zeros if none)
    u: np.ndarray  # (C,) duals of the class rows: the class prices at which subset_bound's SDP steps reach `value`
    lam: np.ndarray  # (F,) duals (>= 0) of the unused-feature links: its link prices there
    seconds: float
    status: str  # SCS's status ("solved", "solved_inaccurate", ...)


def joint_bound(problem: Problem, *, fixed: dict[int, int] | None = None, eps: float = TIGHT_EPS,
                time_limit: float = 600.0) -> JointBound:
    """The lifted relaxation with the class part kept instead of priced: a diagnostic, too slow for `solve_qp`.

    `subset_bound` dualises the class rows and, on dense penalty graphs, bounds the inner problem by `InnerSDP`; at
    any prices that bound is at least the maximum of this convex problem (Lagrangian duality), so this maximum is
    the lowest bound its price steps could reach, however well they converge. Variables: Z as in `InnerSDP` and
    X (F, C) with

        sum_f X[f, c] = m,   0 <= X[f, c] <= s_f,   s_f <= sum_c X[f, c],   s_f = v for (f, v) in `fixed`,

    maximising alpha <A, X> - sum pw_ij Y_ij (distinctness dropped). With `fixed` it bounds one node of a branch
    and bound over s. At CUB size (F = 512, C = 200: 100k more columns) one solve takes 1.5-3 minutes on 2 cores.

    Certified like `InnerSDP.certify`, from any duals: with the slack c + A^T y split into its Z part and X part r,
    max <= y.b - (1 + k) lambda_min(Z part) - sum min(r, 0), because on the feasible set tr Z = 1 + k and
    0 <= X <= 1.
    """
    import scs

    t0 = time.perf_counter()
    inner = InnerSDP(problem)
    n, n_cls, n_var = problem.n_features, problem.n_classes, len(inner.c)
    nx = n * n_cls
    fixed = dict(fixed or {})
    if any(f < 0 or f >= n or v not in (0, 1) for f, v in fixed.items()):
        raise ValueError(f"fixed must map feature indices in [0, {n}) to 0 or 1, got {fixed}")
    f_of, c_of = np.divmod(np.arange(nx), n_cls)  # column n_var + f C + c holds X[f, c]
    s_col = inner.s_idx[f_of]
    ones = np.ones(nx)

    def block(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int) -> sp.csc_matrix:
        return sp.csc_matrix((vals, (rows, cols)), shape=(n_rows, n_var + nx))

    fix_f = np.fromiter(fixed, dtype=np.int64, count=len(fixed))
    eq = sp.vstack([
        sp.hstack([inner.a_eq, sp.csc_matrix((inner.n_eq, nx))]),
        block(c_of, n_var + np.arange(nx), ones, n_cls),  # sum_f X[f, c] = m
        block(np.arange(len(fix_f)), inner.s_idx[fix_f], np.full(len(fix_f), 1.0 / _R2), len(fix_f)),  # s_f = v
    ])
    b_eq = np.concatenate([inner.b[: inner.n_eq], np.full(n_cls, float(problem.m)),
                           np.array([float(fixed[f]) for f in fix_f])])
    rows_x = np.arange(nx)
    nonneg = sp.vstack([
        sp.hstack([inner.a_pair, sp.csc_matrix((inner.n_pair, nx))]),  # Y_ij >= 0
        block(rows_x, n_var + rows_x, -ones, nx),  # X >= 0
        block(np.concatenate([rows_x, rows_x]), np.concatenate([n_var + rows_x, s_col]),
              np.concatenate([ones, np.full(nx, -1.0 / _R2)]), nx),  # X[f, c] - s_f <= 0
        block(np.concatenate([np.arange(n), f_of]), np.concatenate([inner.s_idx, n_var + rows_x]),
              np.concatenate([np.full(n, 1.0 / _R2), -ones]), n),  # s_f - sum_c X[f, c] <= 0
    ])
    psd = block(np.arange(n_var), np.arange(n_var), -np.ones(n_var), n_var)
    a = sp.vstack([eq, nonneg, psd]).tocsc()
    n_z, n_l = eq.shape[0], nonneg.shape[0]
    b = np.concatenate([b_eq, np.zeros(n_l + n_var)])
    c = np.concatenate([inner.c, -problem.alpha * problem.A.ravel()])
    sol = scs.SCS({"A": a, "b": b, "c": c}, {"z": n_z, "l": n_l, "s": [inner.d]}, eps_abs=eps, eps_rel=eps,
                  time_limit_secs=float(time_limit), verbose=False).solve()
    x, y = np.asarray(sol["x"]), np.asarray(sol["y"])
    status = str(sol["info"]["status"])
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return JointBound(value=float("inf"), s=np.zeros(n), u=np.zeros(n_cls), lam=np.zeros(n),
                          seconds=time.perf_counter() - t0, status=status)
    y = np.concatenate([y[:n_z], np.maximum(y[n_z:n_z + n_l], 0.0)])
    slack = c + a[: n_z + n_l].T @ y
    value = float(y @ b[: n_z + n_l]) - inner.trace_term(slack[:n_var]) - float(np.minimum(slack[n_var:], 0.0).sum())
    return JointBound(value=value, s=np.clip(x[inner.s_idx] / _R2, 0.0, 1.0), u=y[inner.n_eq:inner.n_eq + n_cls],
                      lam=y[n_z + n_l - n:], seconds=time.perf_counter() - t0, status=status)
