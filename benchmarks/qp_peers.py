"""QP peers: the same QPM instances given to our solver and, on their own, to HiGHS, SCIP and OR-Tools CP-SAT.

The problem is the one `toolkit.qp.solve_qp` solves (its docstring; docs/qp.md), a maximisation:

    max  alpha sum_{f,c} A[f,c] X[f,c] - sum_{p=(i,j) penalised} pw_p s_i s_j
    s.t. sum_f s_f = k;  sum_f X[f,c] = m (every class);  X[f,c] <= s_f;  s_f <= sum_c X[f,c];  class sets distinct.

Each instance is built once by `toolkit.qp.problem_for` (the same checks, tau and pairs as `solve_qp`) and every
answer, ours or a peer's, is scored by the one exact function `toolkit.qp.objective` after `check_structure` (k
features, m per class, every selected feature used, distinct class sets); a solver's own objective value is never
used. The solvers, each in its own process (a clean HiGHS thread pool, and a hung solver can be killed):

* ours: `solve_qp` with solver "highs" and the same time limit and gap target (its HiGHS calls use HiGHS's default
  thread count, one thread on a 2-core machine; the other phases are numpy);
* highs: HiGHS (highspy) alone, no start and none of our bounds, on the exact MILP of docs/method.md#qp, without
  pruning: s binary; x_fc in [0, 1] for every (feature, class) (integral for a
  fixed integral s: the class and link rows form a bipartite incidence matrix); y_p >= s_i + s_j - 1, y_p in [0, 1]
  for the product terms (the McCormick lower envelope suffices: the penalty is subtracted and pw > 0);
* scip: the same MILP, written by HiGHS as MPS and read by SCIP (pyscipopt), so both solve the identical model.
  The native quadratic form is not used: SCIP would move the quadratic objective into a constraint and linearise
  the binary products s_i s_j with AND constraints, whose LP relaxation is this McCormick envelope plus
  y <= s_i, y <= s_j, which cannot bind in a maximisation that subtracts pw y; no stronger. With --threads > 1 SCIP
  runs its concurrent mode (that many SCIP copies with different settings racing, the only multi-thread mode of the
  PyPI build), otherwise its sequential branch and bound;
* cpsat: CP-SAT on the same constraints with every variable Boolean and y_p = s_i AND s_j. CP-SAT needs integer
  coefficients: each objective coefficient is multiplied by S = 1e7 / (largest |coefficient|) and rounded. The
  answer it finds is re-scored with the exact float objective. Its bound is made a valid float bound by adding the
  worst-case rounding error: any feasible answer has exactly m C ones among the x and at most min(P, k(k-1)/2)
  among the y, so its float objective exceeds its integer objective / S by at most E = (sum of the m C largest
  x rounding errors + the min(P, k(k-1)/2) largest y rounding errors) / S; bound = CP-SAT's bound / S + E.

Distinctness (no two classes with the same set) is lazy for all three peers, as in our own MILP (toolkit/qp/milp.py):
solve; if the solver's best answer has classes sharing a set D, add for each such pair (c, c') the cut
sum_{f in D} (x_fc + x_fc') <= 2m - 1, make those classes' x binary (a fractional x could slip under the cut) and
re-solve, all within the one time limit. Every round's model is a relaxation, so every round's bound is valid for the
full problem and the smallest is kept. The objective reported is the best answer that passes `check_structure`
among every improving solution the solver reported in any round (a solver's last answer may still repeat a class
set when the limit stops the loop); none may pass ("no_answer").

Each (instance, time limit, solver) row: objective, proven upper bound, gap = (bound - objective) / |objective|,
seconds (wall, model building included; the limit is applied to the same clock), status (optimal: gap <= 1e-6;
within_gap: <= --mip-gap; time_limit; no_answer; killed: the process overran the limit by far). All solvers get the
same gap target (--mip-gap, default 1e-4, the reference's Gurobi default) so that none stops earlier than the others.
The sense is checked twice: each solver's own bound must not lie below its own objective, and across the rows of an
instance every bound must lie above every objective (up to 1e-5 relative); a wrong-side bound raises (a bug).

    python benchmarks/qp_peers.py                                  # CUB size, three rules, 60 s and 600 s
    python benchmarks/qp_peers.py --time-limits 60 --json peers.json
    python benchmarks/qp_peers.py --instances --inputs run/inputs.npz --time-limits 60   # a real run's A and R
    python benchmarks/qp_peers.py --instances tiny --time-limits 20                      # the smoke instance
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

# benchmarks/ is a folder of scripts: qp.py sits beside us. Appended, not put first: imported from elsewhere (the
# tests), its scripts must not shadow packages of the same name (benchmarks/serve.py and the `serve` package).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

from qp import config_for, instance, real_instance, rule_R, simulate  # noqa: E402

from toolkit.qp import QPVerificationError, check_structure, objective, problem_for, solve_qp  # noqa: E402
from toolkit.qp.certificate import ZERO_GAP  # noqa: E402
from toolkit.qp.inputs import correlation_A, similarity_R  # noqa: E402
from toolkit.qp.problem import Assignment, Problem, duplicate_groups  # noqa: E402

SOLVERS = ("ours", "highs", "scip", "cpsat")
CUB_INSTANCES = {"cub-reference": "reference", "cub-q95": "q95", "cub-clique": "clique"}
INSTANCES = (*CUB_INSTANCES, "tiny")
# Every solver proves it optimal in well under a second; with seed 2 its optimum without distinctness repeats a
# class set, so the lazy distinctness loop runs one round (seed 0 of the CUB instances is --seed).
TINY = {"F": 24, "C": 8, "k": 10, "m": 3, "seed": 2}
_SIDE_SLACK = 1e-5  # relative: a bound further below an objective than this is a bug (as solve_qp's own check)
_MIN_ROUND_S = 1.0  # no lazy round is started with less time left
_KEEP_SOLUTIONS = 32  # improving solutions kept per round (the last ones, the best)
_KEEP: list[object] = []  # solver objects never freed before the process exits (ScipBackend.alive)
_CPSAT_MAX_COEF = 1e7  # the largest objective coefficient after CP-SAT's integer scaling


@dataclass(frozen=True, eq=False)
class Spec:
    """One instance as given to solve_qp: name, A (F, C), R (F, F) as the rule reads it, rule, k, m."""

    name: str
    A: np.ndarray
    R: np.ndarray
    rule: str
    k: int
    m: int


@dataclass
class Outcome:
    """What one solver produced on one instance within one time limit."""

    solver: str
    objective: float | None  # best answer passing check_structure, scored by toolkit.qp.objective; None: none
    bound: float  # proven upper bound (inf: none)
    status: str
    seconds: float
    rounds: int = 0  # lazy distinctness re-solves
    note: str = ""
    version: str = ""


def make_specs(names: list[str], inputs: list[Path], input_rules: list[str], seed: int) -> list[Spec]:
    """The instances: simulated CUB size (benchmarks/qp.py's F = 512, C = 200, k = 50, m = 5) per rule, the tiny one,
    and each real run's A and R per rule in `input_rules`."""
    specs = []
    cub = None
    for name in names:
        if name == "tiny":
            feats, labels = simulate(TINY["F"], TINY["C"], seed=TINY["seed"])
            A = correlation_A(feats, labels, TINY["C"])
            specs.append(Spec("tiny", A, similarity_R(A), "clique", TINY["k"], TINY["m"]))
            continue
        cub = instance("cub", seed) if cub is None else cub
        rule = CUB_INSTANCES[name]
        specs.append(Spec(name, cub[0], rule_R(cub[0], cub[1], rule, simulated=True), rule, 50, 5))
    for path in inputs:
        A, R = real_instance(path)
        specs += [Spec(f"{path.name}-{rule}", A, rule_R(A, R, rule, simulated=False), rule, 50, 5)
                  for rule in input_rules]
    return specs


# ---------------------------------------------------------------------------------------------------- the MILP


class Milp:
    """F1 in matrix form. Columns: s_f (0..F-1), x_fc (F + f C + c), y_p (F + F C + p); rows: cardinality, class
    sums, links x_fc <= s_f, use s_f <= sum_c x_fc, pairs s_i + s_j - y_p <= 1; distinctness cuts come later."""

    def __init__(self, p: Problem) -> None:
        n, C, P = p.n_features, p.n_classes, len(p.pw)
        self.p, self.n, self.C = p, n, C
        self.n_cols = n + n * C + P
        xs = n + np.arange(n * C).reshape(n, C)  # (F, C) column of x_fc
        self.xcol = xs
        self.cost = np.concatenate([np.zeros(n), (p.alpha * p.A).ravel(), -p.pw])
        self.integer = np.zeros(self.n_cols, dtype=bool)
        self.integer[:n] = True
        f_of_x, c_of_x = np.divmod(np.arange(n * C), C)
        blocks = []  # (row ids, col ids, values, lower, upper) per row family
        r0 = 0

        def add(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
            nonlocal r0
            blocks.append((rows + r0, cols, vals, lo, hi))
            r0 += len(lo)

        inf = math.inf
        add(np.zeros(n, int), np.arange(n), np.ones(n), np.array([p.k]), np.array([p.k]))  # sum s = k
        add(c_of_x, xs.ravel(), np.ones(n * C), np.full(C, p.m), np.full(C, p.m))  # sum_f x_fc = m
        e = np.arange(n * C)
        add(np.concatenate([e, e]), np.concatenate([xs.ravel(), f_of_x]),  # x_fc - s_f <= 0
            np.concatenate([np.ones(n * C), -np.ones(n * C)]), np.full(n * C, -inf), np.zeros(n * C))
        add(np.concatenate([np.arange(n), f_of_x]), np.concatenate([np.arange(n), xs.ravel()]),  # s_f - sum_c x <= 0
            np.concatenate([np.ones(n), -np.ones(n * C)]), np.full(n, -inf), np.zeros(n))
        q = np.arange(P)
        ycol = n + n * C + q
        add(np.concatenate([q, q, q]), np.concatenate([p.pi, p.pj, ycol]),  # s_i + s_j - y_p <= 1
            np.concatenate([np.ones(P), np.ones(P), -np.ones(P)]), np.full(P, -inf), np.ones(P))
        rows, cols, vals, lo, hi = (np.concatenate(z) for z in zip(*blocks, strict=True))
        self.A_rows = sp.csr_matrix((vals, (rows, cols)), shape=(r0, self.n_cols))
        self.row_lo, self.row_hi = lo.astype(float), hi.astype(float)
        self.col_hi = np.ones(self.n_cols)
        self.cut_pairs: set[tuple[tuple[int, ...], int, int]] = set()  # (shared set, class, class) cut

    def new_cuts(self, assignment: Assignment) -> tuple[list[np.ndarray], list[int]]:
        """Cuts for the classes of `assignment` that share a set: (x column indices of each new row, whose
        right-hand side is 2m - 1) and the classes whose x must become binary."""
        rows, classes = [], set()
        for fs, cs in duplicate_groups(assignment).items():
            for a in range(len(cs)):
                for b in range(a + 1, len(cs)):
                    if (fs, cs[a], cs[b]) in self.cut_pairs:
                        continue
                    self.cut_pairs.add((fs, cs[a], cs[b]))
                    rows.append(np.concatenate([self.xcol[list(fs), cs[a]], self.xcol[list(fs), cs[b]]]))
                    classes |= {cs[a], cs[b]}
        return rows, sorted(classes)

    def decode(self, values: np.ndarray | Callable[[], np.ndarray]) -> tuple[np.ndarray, Assignment, str]:
        """(selected, assignment, problem) of a solver's column values; problem is "" when the answer passes
        check_structure, else why not ("2 shared sets", "fractional x", ...)."""
        v = np.asarray(values() if callable(values) else values, dtype=np.float64)[: self.n + self.n * self.C]
        sel = np.flatnonzero(v[: self.n] > 0.5)
        X = v[self.n:].reshape(self.n, self.C)
        assignment = [tuple(int(f) for f in np.flatnonzero(X[:, c] > 0.5)) for c in range(self.C)]
        if np.abs(X - np.round(X)).max(initial=0.0) > 1e-6:
            return sel, assignment, "fractional x"
        try:
            check_structure(sel, assignment, k=self.p.k, m=self.p.m, n_features=self.n)
        except QPVerificationError as exc:
            dups = duplicate_groups(assignment)
            return sel, assignment, f"{len(dups)} shared sets" if dups else str(exc)
        return sel, assignment, ""


@dataclass
class Round:
    """One solve of the current model: improving solutions (column values, or a function giving them; best last),
    bound, finished."""

    solutions: list[np.ndarray | Callable[[], np.ndarray]]
    bound: float
    finished: bool  # solved to the gap target (or proven infeasible)


def lazy_solve(milp: Milp, backend: object, deadline: float, mip_gap: float) -> tuple[float | None, float, int, str]:
    """The lazy distinctness loop shared by the peers (module docstring). Returns (objective, bound, rounds, note)."""
    best: float | None = None
    bound, rounds, notes = math.inf, 0, []
    while deadline - time.perf_counter() >= _MIN_ROUND_S:
        rnd: Round = backend.run(deadline - time.perf_counter())  # type: ignore[attr-defined]
        bound = min(bound, rnd.bound)
        last_problem, last, last_value = "no answer", [], math.nan
        for i, vals in enumerate(reversed(rnd.solutions)):  # best first; the first that passes is the round's answer
            sel, assignment, problem = milp.decode(vals)
            if i == 0:
                last_problem, last = problem, assignment
                # The solver's best answer scored as is (a repeated class set does not change the formula).
                last_value = objective(milp.p, sel, assignment) if len(sel) == milp.p.k else math.nan
            if not problem:
                value = objective(milp.p, sel, assignment)
                best = value if best is None else max(best, value)
                break
        if best is not None and (bound - best) <= mip_gap * abs(best):
            notes.append(f"round {rounds}: proven")
            break
        if not rnd.finished or not rnd.solutions:
            what = f"{last_value:.4f}" + (f" with {last_problem}" if last_problem else " (feasible)")
            notes.append(f"round {rounds}: stopped, solver's last answer {what}" if rnd.solutions
                         else f"round {rounds}: stopped, no answer")
            break
        cut_rows, classes = milp.new_cuts(last)
        if not cut_rows:  # finished with a structurally bad answer that no cut can fix: report, do not loop
            notes.append(f"round {rounds}: {last_problem or 'finished, just outside the gap'}")
            break
        backend.add_cuts(cut_rows, classes)  # type: ignore[attr-defined]
        rounds += 1
    return best, bound, rounds, "; ".join(notes)


class HighsBackend:
    """HiGHS on the MILP (maximise), collecting improving solutions through its callback."""

    def __init__(self, milp: Milp, threads: int, mip_gap: float) -> None:
        import highspy

        self.hs, self.milp = highspy, milp
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", threads)
        h.setOptionValue("mip_rel_gap", mip_gap)
        h.setOptionValue("random_seed", 0)
        h.passModel(self.lp(milp))
        if h.getObjectiveSense()[1] != highspy.ObjSense.kMaximize:
            raise AssertionError("HiGHS model is not a maximisation")
        self.h = h
        self.sols: deque[np.ndarray] = deque(maxlen=_KEEP_SOLUTIONS)
        h.cbMipImprovingSolution.subscribe(self._keep)

    def _keep(self, event: object) -> None:
        sol = np.array(event.data_out.mip_solution)  # type: ignore[attr-defined]
        if len(sol) != self.milp.n_cols:  # only solutions in the original column space can be decoded
            raise AssertionError(f"HiGHS callback solution has {len(sol)} columns, the model {self.milp.n_cols}")
        self.sols.append(sol)

    def lp(self, milp: Milp) -> object:
        hs = self.hs
        lp = hs.HighsLp()
        csc = milp.A_rows.tocsc()
        lp.num_col_, lp.num_row_ = milp.n_cols, milp.A_rows.shape[0]
        lp.col_cost_, lp.col_lower_, lp.col_upper_ = milp.cost, np.zeros(milp.n_cols), milp.col_hi
        lp.row_lower_ = np.where(np.isinf(milp.row_lo), -hs.kHighsInf, milp.row_lo)
        lp.row_upper_ = np.where(np.isinf(milp.row_hi), hs.kHighsInf, milp.row_hi)
        lp.a_matrix_.format_ = hs.MatrixFormat.kColwise
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = csc.indptr, csc.indices, csc.data
        lp.integrality_ = [hs.HighsVarType.kInteger if b else hs.HighsVarType.kContinuous for b in milp.integer]
        lp.sense_ = hs.ObjSense.kMaximize
        return lp

    def run(self, seconds: float) -> Round:
        hs, h = self.hs, self.h
        self.sols.clear()
        h.setOptionValue("time_limit", float(seconds))
        h.run()
        info, status = h.getInfo(), h.getModelStatus()
        bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else math.inf
        if info.primal_solution_status == 2:  # feasible: the final incumbent is the best one
            obj = float(info.objective_function_value)
            if obj > bound + _SIDE_SLACK * max(abs(obj), 1.0):
                raise AssertionError(f"HiGHS bound {bound} below its objective {obj}: wrong sense")
            self.sols.append(np.array(h.getSolution().col_value))
        finished = status in (hs.HighsModelStatus.kOptimal, hs.HighsModelStatus.kInfeasible)
        return Round(list(self.sols), bound, finished)

    def add_cuts(self, rows: list[np.ndarray], classes: list[int]) -> None:
        hs, m = self.hs, self.milp
        starts = np.cumsum([0] + [len(r) for r in rows[:-1]]).astype(np.int32)
        idx = np.concatenate(rows).astype(np.int32)
        self.h.addRows(len(rows), np.full(len(rows), -hs.kHighsInf), np.full(len(rows), 2.0 * m.p.m - 1),
                       len(idx), starts, idx, np.ones(len(idx)))
        cols = m.xcol[:, classes].ravel().astype(np.int32)
        self.h.changeColsIntegrality(len(cols), cols, np.ones(len(cols), dtype=np.uint8))


class ScipBackend:
    """SCIP on the identical MILP (HiGHS writes it as MPS, SCIP reads it); concurrent mode with threads > 1.

    Each round reads the model afresh and adds every cut so far: SCIP's concurrent mode does not re-solve a model
    changed after a solve (measured: status "unknown", no bound, with PySCIPOpt 6.3)."""

    def __init__(self, milp: Milp, threads: int, mip_gap: float, workdir: Path) -> None:
        import pyscipopt

        self.ps, self.milp, self.threads, self.mip_gap = pyscipopt, milp, threads, mip_gap
        self.path = workdir / "f1.mps"
        HighsBackend(milp, 1, mip_gap).h.writeModel(str(self.path))
        self.cuts: list[np.ndarray] = []
        self.binary: set[int] = set()
        # Every round's model and solutions stay alive until the process exits without teardown (_child):
        # PySCIPOpt 6.3 segfaults freeing a model after a second concurrent solve.
        self.alive: list[tuple] = []

    def _model(self, seconds: float) -> tuple[object, list]:
        m = self.ps.Model()
        m.hideOutput()
        m.readProblem(str(self.path))
        if m.getObjectiveSense() != "maximize":
            raise AssertionError(f"SCIP read a {m.getObjectiveSense()} problem, expected maximize")
        by_name = {v.name: v for v in m.getVars()}
        xs = [by_name[f"c{j}"] for j in range(self.milp.n_cols)]  # SCIP's order is not the file's
        for r in self.cuts:
            m.addCons(self.ps.quicksum(xs[j] for j in r) <= 2 * self.milp.p.m - 1)
        for j in self.milp.xcol[:, sorted(self.binary)].ravel():
            m.chgVarType(xs[j], "B")
        m.setParam("limits/gap", self.mip_gap)
        m.setParam("limits/time", float(seconds))
        m.setParam("parallel/maxnthreads", self.threads)
        m.setParam("parallel/minnthreads", self.threads)
        return m, xs

    def run(self, seconds: float) -> Round:
        m, xs = self._model(seconds)
        m.solveConcurrent() if self.threads > 1 else m.optimize()
        bound = float(m.getDualbound())
        bound = bound if np.isfinite(bound) and abs(bound) < 1e19 else math.inf  # SCIP's infinity is 1e20
        sols = m.getSols()[:_KEEP_SOLUTIONS]  # best first
        self.alive.append((m, sols))
        if sols:
            obj = float(m.getSolObjVal(sols[0]))
            if obj > bound + _SIDE_SLACK * max(abs(obj), 1.0):
                raise AssertionError(f"SCIP bound {bound} below its objective {obj}: wrong sense")
        # Read lazily: 100k columns per solution, and lazy_solve usually stops at the first.
        values = [lambda s=s: np.array([m.getSolVal(s, v) for v in xs]) for s in reversed(sols)]  # best last
        return Round(values, bound, m.getStatus() in ("optimal", "gaplimit", "infeasible"))

    def add_cuts(self, rows: list[np.ndarray], classes: list[int]) -> None:
        self.cuts += rows
        self.binary |= set(classes)


class CpSatBackend:
    """CP-SAT on the same constraints, all Boolean, integer objective (module docstring: scale S, error E)."""

    def __init__(self, milp: Milp, threads: int, mip_gap: float) -> None:
        from ortools.sat.python import cp_model

        self.cp, self.milp = cp_model, milp
        p, n, C = milp.p, milp.n, milp.C
        model = cp_model.CpModel()
        v = [model.new_bool_var(f"c{j}") for j in range(milp.n_cols)]  # proto index = column index
        s, x = v[:n], np.array(v[n:n + n * C], dtype=object).reshape(n, C)
        y = v[n + n * C:]
        model.add(cp_model.LinearExpr.sum(s) == p.k)
        for c in range(C):
            model.add(cp_model.LinearExpr.sum(list(x[:, c])) == p.m)
        for f in range(n):
            for c in range(C):
                model.add_implication(x[f, c], s[f])
            model.add_bool_or([~s[f], *x[f]])
        for q, (i, j) in enumerate(zip(p.pi, p.pj, strict=True)):
            model.add_bool_or([~s[i], ~s[j], y[q]])
            model.add_implication(y[q], s[i])
            model.add_implication(y[q], s[j])
        scale = _CPSAT_MAX_COEF / max(float(np.abs(milp.cost).max()), 1e-12)
        coef = np.round(milp.cost * scale)
        err = np.abs(coef - milp.cost * scale)
        n_y = min(len(p.pw), p.k * (p.k - 1) // 2)
        self.scale = scale
        self.error = (np.sort(err[n:n + n * C])[::-1][: p.m * C].sum()
                      + np.sort(err[n + n * C:])[::-1][:n_y].sum()) / scale
        nz = np.flatnonzero(coef)
        model.maximize(cp_model.LinearExpr.weighted_sum([v[j] for j in nz], [int(c) for c in coef[nz]]))
        self.model, self.vars = model, v
        # The full-problem subsolver is max_lp (linearization level 2): the default 2-worker portfolio's default_lp
        # leaves the x <= s links out of its LP and does not close even the tiny instance in minutes.
        self.params = {"num_workers": threads, "relative_gap_limit": mip_gap, "random_seed": 0,
                       "subsolvers": ["max_lp"]}

    def run(self, seconds: float) -> Round:
        cp = self.cp
        solver = cp.CpSolver()
        solver.parameters.max_time_in_seconds = float(seconds)
        for k, val in self.params.items():
            if isinstance(val, list):
                getattr(solver.parameters, k).extend(val)
            else:
                setattr(solver.parameters, k, val)
        sols: deque[np.ndarray] = deque(maxlen=_KEEP_SOLUTIONS)
        n_cols = self.milp.n_cols

        class Keep(cp.CpSolverSolutionCallback):
            def on_solution_callback(self) -> None:
                sol = np.array(self.response_proto.solution, dtype=np.int8)  # proto index = column index
                if len(sol) != n_cols:
                    raise AssertionError(f"CP-SAT solution has {len(sol)} variables, the model {n_cols}")
                sols.append(sol)

        status = solver.solve(self.model, Keep())
        if status in (cp.OPTIMAL, cp.FEASIBLE):
            if solver.objective_value > solver.best_objective_bound + 0.5:
                raise AssertionError("CP-SAT bound below its objective: wrong sense")
            sols.append(np.array([solver.value(v) for v in self.vars], dtype=np.int8))
        bound = solver.best_objective_bound / self.scale + self.error if status != cp.INFEASIBLE else -math.inf
        return Round(list(sols), bound, status in (cp.OPTIMAL, cp.INFEASIBLE))

    def add_cuts(self, rows: list[np.ndarray], classes: list[int]) -> None:
        for r in rows:
            self.model.add(self.cp.LinearExpr.sum([self.vars[j] for j in r]) <= 2 * self.milp.p.m - 1)


# ---------------------------------------------------------------------------------------------------- one job


def status_of(obj: float | None, bound: float, mip_gap: float) -> tuple[float, str]:
    """(gap, status) of a peer's answer, classified as solve_qp classifies its own (toolkit.qp.certificate)."""
    if obj is None:
        return math.inf, "no_answer"
    gap = max(0.0, bound - obj) / max(abs(obj), 1e-9)
    return gap, "optimal" if gap <= ZERO_GAP else "within_gap" if gap <= mip_gap + 1e-12 else "time_limit"


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} ?"


def run_solver(spec: Spec, problem: Problem, solver: str, limit: float, threads: int, mip_gap: float) -> Outcome:
    """One solver on one instance within `limit` seconds (the clock starts before the model is built)."""
    t0 = time.perf_counter()
    if solver == "ours":
        cfg = config_for(spec.rule, spec.R, limit, "highs", k=spec.k, m=spec.m, mip_gap=mip_gap)
        sel = solve_qp(spec.A, spec.R, cfg)
        value = objective(problem, sel.selected, [tuple(fs) for fs in sel.assignment])
        if abs(value - sel.objective) > 1e-9 * max(abs(value), 1.0) or abs(sel.tau - problem.tau) > 0:
            raise AssertionError("solve_qp solved a different instance than problem_for built")
        return Outcome("ours", value, sel.bound, sel.status, time.perf_counter() - t0, sel.lazy_rounds,
                       f"answer {sel.stats['answer_source']}, bound {sel.stats['bound_source']}", sel.solver_version)
    milp = Milp(problem)
    deadline = t0 + limit
    with tempfile.TemporaryDirectory() as tmp:
        if solver == "highs":
            backend, version = HighsBackend(milp, threads, mip_gap), _version("highspy")
        elif solver == "scip":
            backend, version = ScipBackend(milp, threads, mip_gap, Path(tmp)), _version("pyscipopt")
        else:
            backend, version = CpSatBackend(milp, threads, mip_gap), _version("ortools")
        obj, bound, rounds, note = lazy_solve(milp, backend, deadline, mip_gap)
        _KEEP.append(backend)  # freed only by the process exit (ScipBackend.alive)
    if obj is not None and obj - _SIDE_SLACK * max(abs(obj), 1.0) <= bound < obj:
        bound = obj  # the solver's bound below its answer by tolerance only (larger misses are left to check_sides)
    gap, status = status_of(obj, bound, mip_gap)
    return Outcome(solver, obj, bound, status, time.perf_counter() - t0, rounds, note, version)


def _child(conn: object, args: tuple) -> None:
    try:
        conn.send(("ok", run_solver(*args)))  # type: ignore[attr-defined]
    except BaseException as exc:  # report any failure to the parent, which raises it
        import traceback

        conn.send(("error", f"{exc!r}\n{traceback.format_exc()}"))  # type: ignore[attr-defined]
    conn.close()  # type: ignore[attr-defined]
    # Skip interpreter teardown: PySCIPOpt may free a model before its solutions there and crash after the result
    # was sent.
    sys.stdout.flush()
    os._exit(0)


def run_isolated(spec: Spec, problem: Problem, solver: str, limit: float, threads: int, mip_gap: float) -> Outcome:
    """`run_solver` in a fresh process (spawned: HiGHS's thread pool is set once per process), killed if it overruns
    the limit by far."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, (spec, problem, solver, limit, threads, mip_gap)))
    t0 = time.perf_counter()
    proc.start()
    child.close()
    grace = 60.0 + 0.5 * limit
    if parent.poll(limit + grace):
        kind, payload = parent.recv()
        proc.join()
        if kind == "error":
            raise RuntimeError(f"{solver} on {spec.name} failed:\n{payload}")
        return payload
    proc.kill()
    proc.join()
    return Outcome(solver, None, math.inf, "killed", time.perf_counter() - t0, note=f"no answer after {limit + grace}s")


# ---------------------------------------------------------------------------------------------------- report


def check_sides(rows: list[dict]) -> None:
    """Every bound of an instance lies above every objective of that instance (all solvers, all limits)."""
    for name in {r["instance"] for r in rows}:
        mine = [r for r in rows if r["instance"] == name]
        objs = [(r["objective"], r["solver"], r["time_limit"]) for r in mine if r["objective"] is not None]
        if not objs:
            continue
        top, who, lim = max(objs)
        for r in mine:
            if r["bound"] < top - _SIDE_SLACK * max(abs(top), 1.0):
                raise RuntimeError(f"{name}: {r['solver']}'s bound {r['bound']!r} ({r['time_limit']:g}s) is below "
                                   f"{who}'s objective {top!r} ({lim:g}s): a wrong-side bound is a bug")


def verdicts(rows: list[dict]) -> list[str]:
    """Per instance and limit: is our certified gap the smallest, and did a peer find a better objective."""
    lines = []
    for name in dict.fromkeys(r["instance"] for r in rows):
        for limit in dict.fromkeys(r["time_limit"] for r in rows):
            mine = {r["solver"]: r for r in rows if r["instance"] == name and r["time_limit"] == limit}
            ours = mine.get("ours")
            peers = [r for s, r in mine.items() if s != "ours"]
            if ours is None or not peers:
                continue
            best_peer_gap = min(r["gap"] for r in peers)
            smallest = ours["gap"] <= best_peer_gap + 1e-12
            peer_txt = (f"best peer {100 * best_peer_gap:.4f}%" if math.isfinite(best_peer_gap)
                        else "no peer has a feasible answer")
            gap_txt = (f"our gap {100 * ours['gap']:.4f}% is the smallest ({peer_txt})"
                       if smallest else f"our gap {100 * ours['gap']:.4f}% is NOT the smallest: "
                       + ", ".join(f"{r['solver']} {100 * r['gap']:.4f}%" for r in peers if r["gap"] < ours["gap"]))
            low = min(peers, key=lambda r: r["bound"])
            gap_txt += (f"; our bound {ours['bound']:.4f} is {'below' if ours['bound'] <= low['bound'] else 'ABOVE'} "
                        f"the best peer bound {low['bound']:.4f} ({low['solver']})")
            better = [r for r in peers if r["objective"] is not None and ours["objective"] is not None
                      and r["objective"] > ours["objective"] + 1e-9 * max(abs(ours["objective"]), 1.0)]
            obj_txt = ("; a better objective from " + ", ".join(
                f"{r['solver']} (+{r['objective'] - ours['objective']:.6f})" for r in better)
                if better else "; no peer found a better objective")
            lines.append(f"verdict {name} @ {limit:g}s: {gap_txt}{obj_txt}")
    return lines


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def print_tables(rows: list[dict]) -> None:
    for limit in dict.fromkeys(r["time_limit"] for r in rows):
        print(f"\n### time limit {limit:g} s, {rows[0]['threads']} threads\n")
        print("| instance | tau | pairs | solver | objective | bound | gap % | seconds | status | rounds | note |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["time_limit"] == limit:
                print(f"| {r['instance']} ({r['F']}x{r['C']}, k={r['k']}, m={r['m']}) | {r['tau']:.4f} | "
                      f"{r['pairs']:,} | {r['solver']} | {_fmt(r['objective'])} | {_fmt(r['bound'])} | "
                      f"{_fmt(100 * r['gap'])} | {r['seconds']:.1f} | {r['status']} | {r['rounds']} | {r['note']} |")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", nargs="*", default=list(CUB_INSTANCES), choices=INSTANCES,
                    help="simulated instances (default: the three CUB-size rules); tiny: 24 features, 8 classes")
    ap.add_argument("--inputs", type=Path, nargs="*", default=[], help="inputs.npz files (A, R) of real runs")
    ap.add_argument("--input-rules", nargs="+", default=["reference"], choices=("reference", "q95", "clique"),
                    help="rules applied to each --inputs file (default: reference, the toolkit default)")
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    ap.add_argument("--time-limits", type=float, nargs="+", default=[60.0, 600.0], help="seconds, one run each")
    ap.add_argument("--threads", type=int, default=2, help="threads of HiGHS, SCIP (concurrent) and CP-SAT")
    ap.add_argument("--mip-gap", type=float, default=1e-4, help="relative gap target of every solver")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = ap.parse_args(argv)
    specs = make_specs(args.instances, args.inputs, args.input_rules, args.seed)
    if not specs:
        ap.error("no instances: name some with --instances or --inputs")
    rows: list[dict] = []
    for spec in specs:
        problem = problem_for(spec.A, spec.R, config_for(spec.rule, spec.R, 1.0, "highs", k=spec.k, m=spec.m))
        for limit in args.time_limits:
            for solver in args.solvers:
                load = os.getloadavg()[0]
                out = run_isolated(spec, problem, solver, limit, args.threads, args.mip_gap)
                gap = status_of(out.objective, out.bound, args.mip_gap)[0]
                row = {"instance": spec.name, "rule": spec.rule, "F": problem.n_features, "C": problem.n_classes,
                       "k": spec.k, "m": spec.m, "tau": problem.tau, "pairs": int(len(problem.pw)),
                       "time_limit": limit, "threads": args.threads, "mip_gap": args.mip_gap, "gap": gap,
                       "load1_at_start": load, **asdict(out)}
                rows.append(row)
                print(f"[{time.strftime('%X')}] {spec.name} {limit:g}s {solver:5s} objective {_fmt(out.objective)} "
                      f"bound {_fmt(out.bound)} gap {_fmt(100 * gap)}% {out.seconds:.1f}s {out.status} "
                      f"rounds {out.rounds} {out.note}", flush=True)
        check_sides(rows)
    print_tables(rows)
    print()
    for line in verdicts(rows):
        print(line)
    if args.json:
        # JSON has no inf: a bound never produced is written as null.
        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                 for r in rows]
        args.json.write_text(json.dumps(clean, indent=1))
    return rows


if __name__ == "__main__":
    main()
