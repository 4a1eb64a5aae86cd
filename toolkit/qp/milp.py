"""The exact model as a MILP through cvxpy, with lazy distinctness and per-class candidate pruning.

Model (docs/method.md#qp, "F1"), for per-class candidate lists T_c (all features on small instances):

    max  alpha * (sum_{c, f in T_c} A[f, c] x_fc + sum_c a+_c o_c)  -  sum_{p=(i,j)} w R_ij y_p
    s.t. sum_f s_f = k;   sum_{f in T_c} x_fc + o_c = m  (all c);   x_fc <= s_f;
         y_p >= s_i + s_j - 1, y_p >= 0;   s_f <= sum_{c: f in T_c} x_fc + sum_c o_c  (every selected feature is
         used by some class);   s binary, x in [0, 1] (binary for classes in a cut), o_c in [0, m];
         for every duplicate group (D, classes G): z_c >= sum_{f in D} x_fc - (m - 1), z >= 0, sum_{c in G} z_c <= 1.

* X continuous: for a fixed integral s each class's polytope has integral vertices (docs/method.md#qp), so only F
  binaries. Classes named in a cut get binary x, since a fractional x could slip under the cut.
* Pruning with an overflow certificate: o_c stands for "features outside T_c" at the optimistic price
  a+_c = max_{f not in T_c} A[f, c] and needs no selected feature, so the pruned model is a relaxation and its
  bound is valid for the full problem. When a solution uses overflow, T_c of those classes is doubled and the
  model re-solved. The link row gets the total overflow on its right-hand side for the same reason: a full solution
  that uses f for a class where f is outside T_c has that class's overflow >= 1.
* The link rows s_f <= sum_c x_fc keep the per-feature polytope integral for fixed s (a bipartite incidence
  matrix, totally unimodular), so X stays continuous.
* Distinctness is lazy: solve, read each class's set, add one group cut per set shared by several classes
  (excluding exactly that collision), re-solve warm-started from the best feasible answer.
Every bound reported by any round is valid for the full problem (each model is a relaxation of it), so the
smallest one is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from toolkit.qp._checks import rel_gap
from toolkit.qp.assign import distinct_assignment
from toolkit.qp.backends import Backend
from toolkit.qp.heuristic import Candidate
from toolkit.qp.problem import Assignment, Problem, duplicate_groups, unused_features

_FULL_ENTRIES = 40_000  # F * C up to this: no pruning (the model is exact in one go)
_MIN_ROUND_SECONDS = 1.0  # do not start a re-solve with less time than this
_PRICE_MARGIN = 0.05  # candidate x: alpha A[f, c] > u_c - this * alpha (u: the Lagrangian's class prices)
_SOLVER_GAP_SHARE = 0.8  # the solver's own relative gap target, as a share of qp.mip_gap


@dataclass(frozen=True, eq=False, kw_only=True)
class MilpResult:
    best: Candidate | None  # best feasible answer the rounds produced (None if the solver produced none)
    bound: float  # smallest valid bound over the rounds (inf if none)
    rounds: int  # re-solves caused by duplicate class sets (lazy distinctness rounds)
    solves: int
    finished: bool  # proven: the last model solved to the gap with a usable answer, or the gap closed


def candidate_lists(problem: Problem, u: np.ndarray | None, incumbent: Candidate) -> list[np.ndarray]:
    """Per class the features that get an x variable.

    Args:
        problem: the instance.
        u: (C,) class prices of the Lagrangian bound, or None.
        incumbent: its features are always kept, so it is a MIP start without overflow.

    Returns:
        C ascending index arrays: all features on small instances (F * C <= 40k) or without prices, else the
        features with alpha A[f, c] > u_c - 0.05 alpha (at least 2m, the best by A), the only ones with x > 0 in
        an LP optimum with these prices, plus a margin.
    """
    n, n_cls, m = problem.n_features, problem.n_classes, problem.m
    if n * n_cls <= _FULL_ENTRIES or u is None:
        return [np.arange(n) for _ in range(n_cls)]
    aa = problem.alpha * problem.A
    order = np.argsort(-aa, axis=0, kind="stable")
    margin = _PRICE_MARGIN * problem.alpha
    count = (aa > u - margin).sum(0)
    lists = []
    for c in range(n_cls):
        keep = order[: max(int(count[c]), 2 * m), c]
        lists.append(np.union1d(keep, incumbent.assignment[c]))
    return lists


class _Model:
    """The cvxpy model for fixed candidate lists, cuts and binary classes."""

    def __init__(self, problem: Problem, lists: list[np.ndarray], cuts: dict[tuple[int, ...], list[int]]) -> None:
        p = problem
        n, n_cls, m = p.n_features, p.n_classes, p.m
        self.p, self.lists = p, lists
        binary = sorted({c for cs in cuts.values() for c in cs})
        is_bin = np.zeros(n_cls, dtype=bool)
        is_bin[binary] = True
        ef = np.concatenate(lists)
        ec = np.repeat(np.arange(n_cls), [len(t) for t in lists])
        self.ef, self.ec = ef, ec
        bin_edge = is_bin[ec]
        self.cont_idx, self.bin_idx = np.flatnonzero(~bin_edge), np.flatnonzero(bin_edge)
        n_e = len(ef)
        self.s = cp.Variable(n, boolean=True)
        self.xc = cp.Variable(len(self.cont_idx), bounds=[0, 1]) if len(self.cont_idx) else None
        self.xb = cp.Variable(len(self.bin_idx), boolean=True) if len(self.bin_idx) else None
        # x over all edges as one affine expression: E = Pc xc + Pb xb
        parts = []
        for var, idx in ((self.xc, self.cont_idx), (self.xb, self.bin_idx)):
            if var is not None:
                parts.append(sp.csr_matrix((np.ones(len(idx)), (idx, np.arange(len(idx)))), shape=(n_e, len(idx)))
                             @ var)
        x = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        self.outside = np.array([len(t) < n for t in lists])
        a_plus = np.zeros(n_cls)
        for c in np.flatnonzero(self.outside):
            mask = np.ones(n, dtype=bool)
            mask[lists[c]] = False
            a_plus[c] = p.A[mask, c].max()
        self.o_cls = np.flatnonzero(self.outside)
        self.o = cp.Variable(len(self.o_cls), bounds=[0, m]) if len(self.o_cls) else None
        self.y = cp.Variable(len(p.pw), bounds=[0, 1]) if len(p.pw) else None
        class_sum = sp.csr_matrix((np.ones(n_e), (ec, np.arange(n_e))), shape=(n_cls, n_e))
        link = sp.csr_matrix((np.ones(n_e), (np.arange(n_e), ef)), shape=(n_e, n))
        rows = class_sum @ x
        gain = (p.A[ef, ec]) @ x
        if self.o is not None:
            o_map = sp.csr_matrix((np.ones(len(self.o_cls)), (self.o_cls, np.arange(len(self.o_cls)))),
                                  shape=(n_cls, len(self.o_cls)))
            rows = rows + o_map @ self.o
            gain = gain + a_plus[self.o_cls] @ self.o
        used = link.T @ x  # (F,) how many classes use each feature (within the candidate lists)
        if self.o is not None:
            used = used + cp.sum(self.o)
        cons = [cp.sum(self.s) == p.k, rows == m, x <= link @ self.s, self.s <= used]
        objective = p.alpha * gain
        if self.y is not None:
            cons.append(self.y >= self.s[p.pi] + self.s[p.pj] - 1)
            objective = objective - p.pw @ self.y
        self.groups = sorted(cuts.items())
        self.z = None
        if self.groups:
            pos = {(int(f), int(c)): i for i, (f, c) in enumerate(zip(ef, ec, strict=True))}
            r, col, zr, zc = [], [], [], []
            row = 0
            for g, (fs, classes) in enumerate(self.groups):
                for c in classes:
                    for f in fs:
                        if (f, c) in pos:  # a member of D outside T_c: that class cannot use D inside the model
                            r.append(row)
                            col.append(pos[(f, c)])
                    zr.append(g)
                    zc.append(row)
                    row += 1
            self.z = cp.Variable(row, nonneg=True)
            d_mat = sp.csr_matrix((np.ones(len(r)), (r, col)), shape=(row, n_e))
            g_mat = sp.csr_matrix((np.ones(len(zr)), (zr, zc)), shape=(len(self.groups), row))
            cons += [self.z >= d_mat @ x - (m - 1), g_mat @ self.z <= 1]
        self.prob = cp.Problem(cp.Maximize(objective), cons)

    def set_start(self, cand: Candidate) -> None:
        """Load a feasible answer as the MIP start (overflow takes any assigned feature outside T_c)."""
        p = self.p
        sel = np.zeros(p.n_features)
        sel[cand.selected] = 1.0
        self.s.value = sel
        used = {(f, c) for c, fs in enumerate(cand.assignment) for f in fs}
        xv = np.array([1.0 if (int(f), int(c)) in used else 0.0 for f, c in zip(self.ef, self.ec, strict=True)])
        if self.xc is not None:
            self.xc.value = xv[self.cont_idx]
        if self.xb is not None:
            self.xb.value = xv[self.bin_idx]
        if self.o is not None:
            inside = np.bincount(self.ec, xv, p.n_classes)
            self.o.value = (p.m - inside)[self.o_cls]
        if self.y is not None:
            self.y.value = sel[p.pi] * sel[p.pj]
        if self.z is not None:
            zv = []
            for fs, classes in self.groups:
                zv += [1.0 if cand.assignment[c] == fs else 0.0 for c in classes]
            self.z.value = np.asarray(zv)

    def read(self) -> tuple[np.ndarray, Assignment | None, float]:
        """(selection, assignment or None if overflow is used, solver objective with y at its tight value)."""
        p = self.p
        sel = np.sort(np.argsort(-self.s.value)[: p.k]).astype(np.int64)
        xv = np.zeros(len(self.ef))
        for var, idx in ((self.xc, self.cont_idx), (self.xb, self.bin_idx)):
            if var is not None:
                xv[idx] = var.value
        value = float(self.prob.value)
        if self.y is not None:  # a heuristic incumbent may carry slack in y; the objective uses y = s_i s_j
            sv = self.s.value
            value += float(p.pw @ (self.y.value - np.maximum(sv[p.pi] + sv[p.pj] - 1.0, 0.0)))
        if self.o is not None and (self.o.value > 1e-6).any():
            return sel, None, value
        assignment: Assignment = []
        for c in range(p.n_classes):
            lo, hi = np.searchsorted(self.ec, [c, c + 1])
            best = lo + np.argsort(-xv[lo:hi], kind="stable")[: p.m]
            assignment.append(tuple(sorted(int(f) for f in self.ef[best])))
        return sel, assignment, value

    def overflow_classes(self) -> np.ndarray:
        return self.o_cls[self.o.value > 1e-6] if self.o is not None else np.zeros(0, dtype=np.int64)


def repaired(problem: Problem, selected: np.ndarray, source: str) -> Candidate:
    """A feasible answer for a selection: distinct assignment, value from top-m minus its losses."""
    res = distinct_assignment(problem, selected)
    value = problem.topm_value(selected) - problem.penalty(selected) - res.loss
    if not np.isfinite(value):
        value = -np.inf  # no covering assignment found for this selection: never preferred over another answer
    return Candidate(selected=np.sort(selected), assignment=res.assignment, value=value, source=source)


def solve_milp(problem: Problem, incumbent: Candidate, backend: Backend, *, lists: list[np.ndarray],
               deadline: float, mip_gap: float, log: Callable[[str], None]) -> MilpResult:
    """Lazy-distinctness loop of MILP solves, warm-started from `incumbent`, until optimal or `deadline`.

    Args:
        problem: the instance.
        incumbent: a feasible answer (the MIP start; kept if nothing better is found).
        backend: the solver.
        lists: per class the candidate features of x (`candidate_lists`); grown where overflow is used.
        deadline: `time.perf_counter()` value at which solving stops.
        mip_gap: relative gap at which the loop stops.
        log: progress lines.
    """
    lists = [np.asarray(t) for t in lists]
    cuts: dict[tuple[int, ...], list[int]] = {}
    best: Candidate | None = None
    bound, rounds, solves, finished = float("inf"), 0, 0, False
    while time.perf_counter() + _MIN_ROUND_SECONDS < deadline:
        t0 = time.perf_counter()
        model = _Model(problem, lists, cuts)
        start = incumbent if best is None or incumbent.value >= best.value else best
        model.set_start(start)
        # The solver measures its gap against its own incumbent, which overflow can inflate; aim a bit lower so
        # that one round usually proves the real gap instead of needing another.
        backend.solve(model.prob, time_limit=deadline - time.perf_counter(), mip_gap=_SOLVER_GAP_SHARE * mip_gap)
        solves += 1
        bound = min(bound, backend.bound(model.prob))
        status = model.prob.status
        if model.s.value is None or status not in ("optimal", "optimal_inaccurate", "user_limit"):
            log(f"qp: MILP round {solves} returned no solution ({status})")
            break
        sel, assignment, value = model.read()
        dups = duplicate_groups(assignment) if assignment is not None else {}
        grow = model.overflow_classes()
        log(f"qp: MILP round {solves}: {len(np.concatenate(lists))} x, {len(cuts)} cuts, value {value:.4f}, "
            f"bound {bound:.4f}, {sum(map(len, dups.values()))} colliding, {len(grow)} overflowing "
            f"({time.perf_counter() - t0:.1f}s)")
        if assignment is not None and not dups and not unused_features(sel, assignment):
            cand = Candidate(selected=sel, assignment=assignment, value=value, source=backend.name)
            finished = status == "optimal"
        else:
            cand = repaired(problem, sel, f"{backend.name}+repair")
        if best is None or cand.value > best.value:
            best = cand
        if rel_gap(max(best.value, incumbent.value), bound) <= mip_gap:
            finished = True  # the answer in hand is proven within the gap, whatever the model still lacks
        if finished or status != "optimal":
            break  # proven, or the time limit stopped this round
        for fs, classes in dups.items():
            cuts[fs] = sorted(set(cuts.get(fs, [])) | set(classes))
        rounds += bool(dups)
        for c in grow:
            n_keep = min(problem.n_features, 2 * len(lists[c]))
            top = np.argsort(-problem.A[:, c], kind="stable")[:n_keep]
            lists[c] = np.union1d(lists[c], top)
    return MilpResult(best=best, bound=bound, rounds=rounds, solves=solves, finished=finished)
