"""`solve_qp`: pre-checks, tau, heuristic, certified bounds, MILP, verification -> `Selection`.

Time budget (cfg.time_limit, seconds, counted from the call): the greedy and the first local-search descents
always finish; iterated local search runs until 5 % of the budget. Then the LP-Lagrangian bound (`bound`) until
15 % (all of the budget with the heuristic solver), whose prices start the subset-Lagrangian bound (`subset_bound`,
the penalty kept exact) until 85 %; every selection it meets is polished by local search. The MILP gets what is left
if the gap is still open; when that would be under 10 s (budgets under 67 s), the subset bound runs until 95 %.
On small instances (F C <= 40k, no pruning) the MILP runs first, until 60 %, and the subset bound after it. The
MILP is skipped for HiGHS/SCIP when the pruned model would exceed `_MILP_MAX_COLUMNS` columns (ImageNet size: its
root LP alone does not finish in minutes on 2 cores) or when less than 10 s are left; iterated local search then
uses the rest of the time. Each stage stops early once the answer is proven within cfg.mip_gap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from toolkit.config import QPConfig
from toolkit.qp._checks import QPInputError, QPVerificationError, check_inputs, check_solver_name, rel_gap
from toolkit.qp.backends import Backend, resolve_backend
from toolkit.qp.bound import dual_bound
from toolkit.qp.certificate import ZERO_GAP, Selection, verify, weight_matrix
from toolkit.qp.heuristic import Candidate, finish, iterated_local_search, local_search, run_heuristic
from toolkit.qp.inputs import similarity_R
from toolkit.qp.milp import _FULL_ENTRIES, candidate_lists, solve_milp
from toolkit.qp.problem import Problem, build_problem, input_sha256
from toolkit.qp.subset_bound import subset_bound
from toolkit.qp.threshold import choose_tau, reference_pairs

_ILS_SHARE = 0.05  # of the time budget: iterated local search (rarely gains on these instances, see the results)
_BOUND_SHARE = 0.15  # the LP-Lagrangian bound before the subset bound (its prices start it and prune the MILP)
_SUBSET_SHARE = 0.85  # the subset-Lagrangian bound runs until this share of the budget
_ILS_END_SHARE = 0.95  # the subset bound's end when no MILP follows (iterated local search gets the rest)
_SMALL_MILP_SHARE = 0.6  # small instances (no pruning needed) run the MILP first, until this share
_MIN_MILP_SECONDS = 10.0  # a MILP round with less time than this proves nothing at CUB size; ILS gets the time
_MILP_MAX_COLUMNS = 120_000  # x + y columns above which HiGHS/SCIP are not tried (Gurobi always is)
_BOUND_SLACK = 1e-5  # a bound below the objective by more than this (relative) means a bug, not rounding


def _polish(problem: Problem, selected: np.ndarray, source: str, deadline: float) -> Candidate:
    """Local search plus distinctness-aware polishing from another method's selection."""
    sel, v = local_search(problem, selected, deadline)
    return finish(problem, sel, v, deadline, f"{source}+ls")


def _status(gap: float, mip_gap: float, exact: bool) -> str:
    """What the certificate proves (certificate.STATUSES)."""
    if gap <= ZERO_GAP:
        return "optimal"
    if gap <= mip_gap + 1e-12:
        return "within_gap"
    return "time_limit" if exact else "heuristic"


def _better(a: Candidate, b: Candidate) -> Candidate:
    return b if b.value > a.value else a


@dataclass
class _Progress:
    """The best answer and the smallest valid bound so far, with the component that produced the bound."""

    best: Candidate
    bound: float
    bound_source: str

    def offer(self, cand: Candidate) -> float:
        self.best = _better(self.best, cand)
        return self.best.value

    def offer_bound(self, value: float, source: str) -> None:
        if value < self.bound:
            self.bound, self.bound_source = value, source


def solve_qp(A: np.ndarray, R: np.ndarray | None, cfg: QPConfig,
             log: Callable[[str], None] | None = None) -> Selection:
    """Select k features and assign m to each class with pairwise different sets, with a certificate.

    Args:
        A: (F, C) feature-class correlation (max|A| = 1; see toolkit.qp.inputs.correlation_A).
        R: (F, F) feature similarity, read on its upper triangle; None = cosine of A's rows (similarity_R).
        cfg: k, m, tau (None = found by cfg.redundancy_rule), redundancy weight and rule, solver, time limit, gap.
            With redundancy_rule "reference" the penalty is also min-max rescaled (as in the reference code), also
            for a fixed tau.
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
    rule = cfg.redundancy_rule
    if rule not in ("clique", "reference"):
        raise QPInputError(f"qp.redundancy_rule must be 'clique' or 'reference', got {rule!r}")
    if reference:  # RobertZimm/DINO-QPM's rule, reproduced on purpose (threshold.reference_pairs)
        rp = reference_pairs(r, k, cfg.redundancy_threshold)
        tau, starts = rp.tau, [rp.compatible]
        say(f"qp: reference rule, tau = {tau:.6g} (searched on R + R^T, {rp.probes} probes, applied to R)")
    elif cfg.redundancy_threshold is None:
        th = choose_tau(r, k)
        tau, starts = th.tau, [th.compatible]
        say(f"qp: tau = {tau:.6g} (clique rule: lowest threshold with {k} pairwise-compatible features, "
            f"{th.probes} probes)")
    else:
        tau = float(cfg.redundancy_threshold)
    if reference:
        problem = rp.problem(a, k=k, m=m, w=cfg.redundancy_weight)
    else:
        problem = build_problem(a, r, k=k, m=m, tau=tau, w=cfg.redundancy_weight)
    budget = cfg.time_limit
    say(f"qp: F={problem.n_features} C={problem.n_classes} k={k} m={m}, {len(problem.pw)} penalised pairs")

    t1 = time.perf_counter()
    best = run_heuristic(problem, starts, t0 + _ILS_SHARE * budget)
    t_heur = time.perf_counter() - t1
    heuristic_value = best.value
    say(f"qp: heuristic {best.value:.6f} ({t_heur:.1f}s)")

    def proven(value: float, ub: float) -> bool:
        return rel_gap(value, ub) <= max(cfg.mip_gap, ZERO_GAP)  # a zero target means "up to solver tolerance"

    t1 = time.perf_counter()
    dual = dual_bound(problem, t0 + (budget if backend is None else _BOUND_SHARE * budget),
                      target=best.value + cfg.mip_gap * abs(best.value))
    bound = dual.value
    # The Lagrangian's own selection (top-k scores) is a further start for the local search.
    top_k = np.sort(np.argsort(-dual.g)[:k])
    best = _better(best, _polish(problem, top_k, "lp-bound", t0 + budget))
    t_bound = time.perf_counter() - t1
    say(f"qp: LP-Lagrangian bound {bound:.6f}, gap {rel_gap(best.value, bound):.3%} ({t_bound:.1f}s)")

    state = _Progress(best=best, bound=bound, bound_source="lagrangian-lp")
    sub_info: dict[str, float | int] = {}
    milp_info: dict[str, float | int | bool | str] = {}
    rounds = 0

    def open_gap() -> bool:
        return backend is not None and not proven(state.best.value, state.bound)

    def run_subset(deadline: float) -> None:
        if not open_gap() or not len(problem.pw) or time.perf_counter() >= deadline:
            return
        t1 = time.perf_counter()

        def on_selection(sel: np.ndarray) -> float:
            # Each inner optimum is a good selection: polish it (a few seconds at most) and keep the best answer.
            return state.offer(_polish(problem, sel, "subset-bound", min(t0 + budget, time.perf_counter() + 5.0)))

        inc = state.best
        sub = subset_bound(problem, dual.u, deadline, incumbent=inc.value, target=inc.value * (1 + cfg.mip_gap),
                           start=inc.selected, on_selection=on_selection)
        state.offer_bound(sub.value, f"lagrangian-subset-{sub.phase}")
        sub_info.update({"subset_bound": sub.value, "subset_iterations": sub.iterations, "subset_phase": sub.phase,
                         "subset_sdp_solves": sub.sdp_solves,
                         "subset_seconds": time.perf_counter() - t1, "subset_inner_seconds": sub.inner_seconds})
        say(f"qp: subset-Lagrangian bound {sub.value:.6f} ({sub.iterations} inner solves, best from the "
            f"{sub.phase.upper()} inner relaxation), answer "
            f"{state.best.value:.6f}, gap {rel_gap(state.best.value, state.bound):.3%} "
            f"({time.perf_counter() - t1:.1f}s)")

    def run_milp(deadline: float) -> None:
        nonlocal rounds
        if not open_gap():
            return
        assert backend is not None
        left = deadline - time.perf_counter()
        lists = candidate_lists(problem, dual.u, state.best)
        columns = sum(len(t) for t in lists) + len(problem.pw)
        if backend.name != "gurobi" and (columns > _MILP_MAX_COLUMNS or left < _MIN_MILP_SECONDS):
            # Measured (benchmarks/qp_results.md): open-source simplex does not finish the root LP of a model this
            # size within minutes on 2 cores, so the time goes to the answer instead.
            why = f"{columns} columns" if columns > _MILP_MAX_COLUMNS else f"{left:.1f}s left"
            say(f"qp: MILP skipped ({why})")
            milp_info["milp_skipped"] = why
            return
        t1 = time.perf_counter()
        res = solve_milp(problem, state.best, backend, lists=lists, deadline=deadline, mip_gap=cfg.mip_gap,
                         log=say)
        rounds = res.rounds
        state.offer_bound(res.bound, f"milp-{backend.name}")
        if res.best is not None:
            state.offer(res.best)
            if "repair" in res.best.source:  # a repaired MILP selection may sit next to a better one
                state.offer(_polish(problem, res.best.selected, res.best.source, t0 + budget))
        milp_info.update({"milp_bound": res.bound, "milp_solves": res.solves, "milp_finished": res.finished,
                          "milp_seconds": time.perf_counter() - t1})

    if problem.n_features * problem.n_classes <= _FULL_ENTRIES:
        # Small instance: the exact MILP (unpruned, link included) usually closes the gap in seconds.
        run_milp(t0 + _SMALL_MILP_SHARE * budget)
        run_subset(t0 + _SUBSET_SHARE * budget)
    else:
        lists = candidate_lists(problem, dual.u, best)
        too_big = (backend is not None and backend.name != "gurobi"
                   and sum(len(t) for t in lists) + len(problem.pw) > _MILP_MAX_COLUMNS)
        # A MILP share below _MIN_MILP_SECONDS would be skipped anyway (60 s budgets: 9 s).
        no_room = backend is not None and backend.name != "gurobi" and (1 - _SUBSET_SHARE) * budget < _MIN_MILP_SECONDS
        # When the MILP cannot run anyway, the subset bound keeps the time a MILP would have had.
        run_subset(t0 + (_ILS_END_SHARE if too_big or no_room else _SUBSET_SHARE) * budget)
        run_milp(t0 + budget)
    best, bound, bound_source = state.best, state.bound, state.bound_source
    if open_gap() and time.perf_counter() < t0 + budget:
        say("qp: iterated local search uses the remaining time")
        best = iterated_local_search(problem, best, t0 + budget, rng=np.random.default_rng(1), max_kicks=10**6,
                                     patience=10**6)

    value = verify(problem, best.selected, best.assignment, best.value)
    if bound < value - _BOUND_SLACK * max(abs(value), 1.0):
        raise QPVerificationError(f"bound {bound!r} is below the objective {value!r}: the bound is invalid")
    bound = max(bound, value)
    gap = rel_gap(value, bound)
    status = _status(gap, cfg.mip_gap, exact=backend is not None)
    seconds = time.perf_counter() - t0
    say(f"qp: {status}: objective {value:.6f}, bound {bound:.6f}, gap {gap:.3%}, {seconds:.1f}s "
        f"(answer from {best.source}, bound from {bound_source})")
    n_pairs_all = problem.n_features * (problem.n_features - 1) // 2
    stats = {"answer_source": best.source, "bound_source": bound_source, "heuristic_objective": heuristic_value,
             "lagrangian_bound": dual.value, "n_pairs": int(len(problem.pw)),
             "pairs_share": len(problem.pw) / max(n_pairs_all, 1), "heuristic_seconds": t_heur,
             "bound_seconds": t_bound, "redundancy_weight": problem.w, "redundancy_rule": cfg.redundancy_rule,
             "mip_gap": cfg.mip_gap, **sub_info,
             **milp_info}
    sel = best.selected.astype(np.int64)
    assignment = [list(fs) for fs in best.assignment]
    return Selection(selected=sel, assignment=assignment, weight=weight_matrix(sel, assignment), objective=value,
                     bound=bound, gap=gap, status=status, seconds=seconds,
                     solver=backend.name if backend else "heuristic",
                     solver_version=backend.version if backend else f"toolkit heuristic, numpy {np.__version__}",
                     tau=tau, lazy_rounds=rounds, input_sha256=input_sha256(a, r), stats=stats)
