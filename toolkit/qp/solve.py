"""`solve_qp`: pre-checks, tau, heuristic, certified bound, MILP, verification -> `Selection`.

Time budget (cfg.time_limit, seconds, counted from the call): the greedy and the first local-search descents
always finish; iterated local search runs until 5 % of the budget, the Lagrangian bound until 25 % (all of it with
the heuristic solver), the MILP gets what is left. The MILP is skipped when the answer is already proven within
cfg.mip_gap, and, for HiGHS/SCIP, when the pruned model would exceed `_MILP_MAX_COLUMNS` columns (ImageNet size:
its root LP alone does not finish in minutes on 2 cores); the bound then keeps improving instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from toolkit.config import QPConfig
from toolkit.qp._checks import QPVerificationError, check_inputs, check_solver_name, rel_gap
from toolkit.qp.backends import Backend, resolve_backend
from toolkit.qp.bound import dual_bound
from toolkit.qp.certificate import Selection, verify, weight_matrix
from toolkit.qp.heuristic import Candidate, finish, iterated_local_search, local_search, run_heuristic
from toolkit.qp.inputs import similarity_R
from toolkit.qp.milp import candidate_lists, solve_milp
from toolkit.qp.problem import Problem, build_problem, input_sha256
from toolkit.qp.threshold import choose_tau, reference_pairs

_ILS_SHARE = 0.05  # of the time budget: iterated local search (rarely gains on these instances, see the results)
_BOUND_SHARE = 0.25  # the Lagrangian bound before a MILP (its prices prune the MILP, whose root LP is as tight)
_MILP_MAX_COLUMNS = 120_000  # x + y columns above which HiGHS/SCIP are not tried (Gurobi always is)
_BOUND_SLACK = 1e-5  # a bound below the objective by more than this (relative) means a bug, not rounding


def _polish(problem: Problem, selected: np.ndarray, source: str, deadline: float) -> Candidate:
    """Local search plus distinctness-aware polishing from another method's selection."""
    sel, v = local_search(problem, selected, deadline)
    return finish(problem, sel, v, deadline, f"{source}+ls")


def _better(a: Candidate, b: Candidate) -> Candidate:
    return b if b.value > a.value else a


def solve_qp(A: np.ndarray, R: np.ndarray | None, cfg: QPConfig,
             log: Callable[[str], None] | None = None) -> Selection:
    """Select k features and assign m to each class with pairwise different sets, with a certificate.

    Args:
        A: (F, C) feature-class correlation (max|A| = 1; see toolkit.qp.inputs.correlation_A).
        R: (F, F) feature similarity, read on its upper triangle; None = cosine of A's rows (similarity_R).
        cfg: k, m, tau (None = clique rule), redundancy weight, solver, time limit and gap.
        log: progress lines (e.g. a console's log); silent if None.

    Returns:
        The verified answer with objective, valid upper bound, gap, status and provenance.

    Raises:
        QPInputError, QPInfeasibleError: before any solving, for malformed inputs or impossible settings.
        QPSolverError: the requested solver is unavailable.
    """
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    solver = check_solver_name(cfg.solver)
    a, r = check_inputs(A, R, cfg)
    backend: Backend | None = None if solver == "heuristic" else resolve_backend(solver)
    reference = cfg.redundancy_rule == "reference"
    r = similarity_R(a, keep_negative=reference) if r is None else r
    k, m = cfg.n_features, cfg.n_per_class
    starts: list[np.ndarray] = []
    if reference:  # RobertZimm/DINO-QPM's rule, reproduced on purpose (threshold.reference_pairs)
        rp = reference_pairs(r, k, cfg.redundancy_threshold)
        tau, starts = rp.tau, [rp.compatible]
        say(f"qp: reference rule, tau = {tau:.6g} (searched on R + R^T, {rp.probes} probes, applied to R)")
    elif cfg.redundancy_threshold is None:
        th = choose_tau(r, k)
        tau, starts = th.tau, [th.compatible]
        say(f"qp: tau = {tau:.6g} (lowest threshold with {k} pairwise-compatible features, {th.probes} probes)")
    else:
        tau = float(cfg.redundancy_threshold)
    if reference:
        w = cfg.redundancy_weight
        keep = np.ones(len(rp.pi), dtype=bool) if w > 0 else np.zeros(len(rp.pi), dtype=bool)
        problem = Problem(A=a, pi=rp.pi[keep], pj=rp.pj[keep], pw=w * rp.penalty[keep], k=k, m=m, tau=tau, w=w)
    else:
        problem = build_problem(a, r, k=k, m=m, tau=tau, w=cfg.redundancy_weight)
    budget = cfg.time_limit
    say(f"qp: F={problem.n_features} C={problem.n_classes} k={k} m={m}, {len(problem.pw)} penalised pairs")

    t1 = time.perf_counter()
    best = run_heuristic(problem, starts, t0 + _ILS_SHARE * budget)
    t_heur = time.perf_counter() - t1
    heuristic_value = best.value
    say(f"qp: heuristic {best.value:.6f} ({t_heur:.1f}s)")

    t1 = time.perf_counter()
    dual = dual_bound(problem, t0 + (budget if backend is None else _BOUND_SHARE * budget),
                      target=best.value + cfg.mip_gap * abs(best.value))
    bound = dual.value
    # The Lagrangian's own selection (top-k scores) is a further start for the local search.
    top_k = np.sort(np.argsort(-dual.g)[:k])
    best = _better(best, _polish(problem, top_k, "bound", t0 + budget))
    t_bound = time.perf_counter() - t1
    say(f"qp: Lagrangian bound {bound:.6f}, gap {rel_gap(best.value, bound):.3%} ({t_bound:.1f}s)")

    milp_info: dict[str, float | int | bool | str] = {}
    rounds = 0
    if backend is not None and rel_gap(best.value, bound) > cfg.mip_gap:
        lists = candidate_lists(problem, dual.u, best)
        columns = sum(len(t) for t in lists) + len(problem.pw)
        if backend.name != "gurobi" and columns > _MILP_MAX_COLUMNS:
            # Measured (qpbench.md, benchmarks/qp_results.md): open-source simplex does not finish the root LP of
            # a model this size within minutes on 2 cores, so the time goes to the bound instead.
            say(f"qp: MILP skipped: {columns} columns exceed {_MILP_MAX_COLUMNS} for {backend.name}; "
                f"the Lagrangian bound continues")
            milp_info = {"milp_skipped": f"{columns} columns"}
            more = dual_bound(problem, t0 + (1 - _ILS_SHARE) * budget, u0=dual.u, mu0=dual.mu,
                              target=best.value + cfg.mip_gap * abs(best.value))
            bound = min(bound, more.value)
            top_k = np.sort(np.argsort(-more.g)[:k])  # the refined Lagrangian selection as one more start
            best = _better(best, _polish(problem, top_k, "bound", t0 + budget))
            # Whatever time the bound left (it stops once it stalls) goes to the primal side.
            best = iterated_local_search(problem, best, t0 + budget, rng=np.random.default_rng(1),
                                         max_kicks=10**6, patience=10**6)
        else:
            t1 = time.perf_counter()
            res = solve_milp(problem, best, backend, lists=lists, deadline=t0 + budget, mip_gap=cfg.mip_gap,
                             log=say)
            rounds = res.rounds
            bound = min(bound, res.bound)
            if res.best is not None:
                best = _better(best, res.best)
                if "repair" in res.best.source:  # a repaired MILP selection may sit next to a better one
                    best = _better(best, _polish(problem, res.best.selected, res.best.source, t0 + budget))
            milp_info = {"milp_bound": res.bound, "milp_solves": res.solves, "milp_finished": res.finished,
                         "milp_seconds": time.perf_counter() - t1}

    value = verify(problem, best.selected, best.assignment, best.value)
    if bound < value - _BOUND_SLACK * max(abs(value), 1.0):
        raise QPVerificationError(f"bound {bound!r} is below the objective {value!r}: the bound is invalid")
    bound = max(bound, value)
    gap = rel_gap(value, bound)
    if backend is None:
        status = "heuristic"
    else:
        status = "optimal" if gap <= cfg.mip_gap + 1e-12 else "time_limit"
    seconds = time.perf_counter() - t0
    say(f"qp: {status}: objective {value:.6f}, bound {bound:.6f}, gap {gap:.3%}, {seconds:.1f}s "
        f"(answer from {best.source})")
    stats = {"answer_source": best.source, "heuristic_objective": heuristic_value, "lagrangian_bound": dual.value,
             "n_pairs": int(len(problem.pw)), "heuristic_seconds": t_heur, "bound_seconds": t_bound,
             "redundancy_weight": problem.w, "redundancy_rule": cfg.redundancy_rule,
             "mip_gap": cfg.mip_gap, **milp_info}
    sel = best.selected.astype(np.int64)
    assignment = [list(fs) for fs in best.assignment]
    return Selection(selected=sel, assignment=assignment, weight=weight_matrix(sel, assignment), objective=value,
                     bound=bound, gap=gap, status=status, seconds=seconds,
                     solver=backend.name if backend else "heuristic",
                     solver_version=backend.version if backend else f"toolkit heuristic, numpy {np.__version__}",
                     tau=tau, lazy_rounds=rounds, input_sha256=input_sha256(a, r), stats=stats)
