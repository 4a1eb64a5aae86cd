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

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from toolkit.config import QPConfig
from toolkit.qp._checks import QPInputError, QPVerificationError, check_inputs, check_solver_name, rel_gap
from toolkit.qp.backends import Backend, resolve_backend
from toolkit.qp.bound import DualBound, dual_bound
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
class _Run:
    """One `solve_qp` call: its fixed inputs, the best answer and the smallest valid bound its phases found so far
    (with the component that produced the bound), and what each phase reports in `Selection.stats`."""

    problem: Problem
    cfg: QPConfig
    backend: Backend | None  # None: the heuristic solver (no MILP, no subset bound)
    say: Callable[[str], None]
    t0: float  # `time.perf_counter()` at the call: every phase's deadline is a share of the budget from here
    best: Candidate
    bound: float = math.inf
    bound_source: str = ""
    dual: DualBound | None = None
    stats: dict[str, float | int | str] = field(default_factory=dict)  # heuristic and LP-Lagrangian phases
    sub_info: dict[str, float | int] = field(default_factory=dict)  # subset phase
    milp_info: dict[str, float | int | bool | str] = field(default_factory=dict)  # MILP phase
    rounds: int = 0  # the MILP's lazy rounds

    def at(self, share: float) -> float:
        """The deadline at `share` of the budget."""
        return self.t0 + share * self.cfg.time_limit

    def offer(self, cand: Candidate) -> float:
        """Keep the better answer; return the best value."""
        self.best = _better(self.best, cand)
        return self.best.value

    def offer_bound(self, value: float, source: str) -> None:
        """Keep the smaller bound."""
        if value < self.bound:
            self.bound, self.bound_source = value, source

    def open_gap(self) -> bool:
        """Whether an exact solver is in use and the answer is not yet proven within cfg.mip_gap."""
        proven = rel_gap(self.best.value, self.bound) <= max(self.cfg.mip_gap, ZERO_GAP)  # 0: up to solver tolerance
        return self.backend is not None and not proven


def solve_qp(A: np.ndarray, R: np.ndarray | None, cfg: QPConfig,
             log: Callable[[str], None] | None = None) -> Selection:
    """Select k features and assign m to each class with pairwise different sets, with a certificate.

    The phases, in order (the module docstring gives their time shares): `_validate` -> `_build_problem` (tau) ->
    `_heuristic_phase` -> `_lagrangian_phase` -> `_subset_and_milp_phases` (`_subset_phase`, `_milp_phase`) ->
    `_final_search_phase` -> `_certify`.

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
    a, r, backend = _validate(A, R, cfg)
    problem, tau, starts = _build_problem(a, r, cfg, say)
    run = _heuristic_phase(problem, starts, cfg, backend, say, t0)
    _lagrangian_phase(run)
    _subset_and_milp_phases(run)
    _final_search_phase(run)
    return _certify(run, tau, input_sha256(a, r))


def problem_for(A: np.ndarray, R: np.ndarray | None, cfg: QPConfig) -> Problem:
    """The instance `solve_qp(A, R, cfg)` solves: the same pre-checks, tau and penalised pairs, so that other solvers
    can be given exactly the same problem (benchmarks/qp_peers.py) and scored by `problem.objective`.

    Raises:
        QPInputError, QPInfeasibleError: as `solve_qp`, for malformed inputs or impossible settings.
    """
    a, r, _ = _validate(A, R, cfg.model_copy(update={"solver": "heuristic"}))  # no backend needed to build it
    return _build_problem(a, r, cfg, lambda _msg: None)[0]


def _validate(A: np.ndarray, R: np.ndarray | None, cfg: QPConfig) -> tuple[np.ndarray, np.ndarray, Backend | None]:
    """Pre-checks before any solving: the inputs, the solver (resolved to a backend; None for the heuristic) and
    the redundancy rule. Returns (A, R, backend), with R the cosine of A's rows when it was None."""
    solver = check_solver_name(cfg.solver)
    a, r = check_inputs(A, R, cfg)
    backend = None if solver == "heuristic" else resolve_backend(solver)
    r = similarity_R(a, keep_negative=cfg.redundancy_rule == "reference") if r is None else r
    if cfg.redundancy_rule not in ("clique", "reference"):
        raise QPInputError(f"qp.redundancy_rule must be 'clique' or 'reference', got {cfg.redundancy_rule!r}")
    return a, r, backend


def _build_problem(a: np.ndarray, r: np.ndarray, cfg: QPConfig,
                   say: Callable[[str], None]) -> tuple[Problem, float, list[np.ndarray]]:
    """The threshold tau by cfg.redundancy_rule (unless fixed) and the problem it defines. Returns (problem, tau,
    starts), starts being the threshold search's k compatible features, a first selection for the heuristic."""
    k, m = cfg.n_features, cfg.n_per_class
    if cfg.redundancy_rule == "reference":  # RobertZimm/DINO-QPM's rule, reproduced on purpose (reference_pairs)
        rp = reference_pairs(r, k, cfg.redundancy_threshold)
        say(f"qp: reference rule, tau = {rp.tau:.6g} (searched on R + R^T, {rp.probes} probes, applied to R)")
        problem, tau, starts = rp.problem(a, k=k, m=m, w=cfg.redundancy_weight), rp.tau, [rp.compatible]
    elif cfg.redundancy_threshold is None:
        th = choose_tau(r, k)
        say(f"qp: tau = {th.tau:.6g} (clique rule: lowest threshold with {k} pairwise-compatible features, "
            f"{th.probes} probes)")
        tau, starts = th.tau, [th.compatible]
        problem = build_problem(a, r, k=k, m=m, tau=tau, w=cfg.redundancy_weight)
    else:
        tau, starts = float(cfg.redundancy_threshold), []
        problem = build_problem(a, r, k=k, m=m, tau=tau, w=cfg.redundancy_weight)
    say(f"qp: F={problem.n_features} C={problem.n_classes} k={k} m={m}, {len(problem.pw)} penalised pairs")
    return problem, tau, starts


def _heuristic_phase(problem: Problem, starts: list[np.ndarray], cfg: QPConfig, backend: Backend | None,
                     say: Callable[[str], None], t0: float) -> _Run:
    """The first answer: greedy and local search from each start, then iterated local search until _ILS_SHARE of
    the budget. Starts the run's record with it."""
    t1 = time.perf_counter()
    best = run_heuristic(problem, starts, t0 + _ILS_SHARE * cfg.time_limit)
    seconds = time.perf_counter() - t1
    say(f"qp: heuristic {best.value:.6f} ({seconds:.1f}s)")
    return _Run(problem=problem, cfg=cfg, backend=backend, say=say, t0=t0, best=best,
                stats={"heuristic_objective": best.value, "heuristic_seconds": seconds})


def _lagrangian_phase(run: _Run) -> None:
    """The LP-Lagrangian bound (`bound.dual_bound`) until _BOUND_SHARE of the budget (all of it with the heuristic
    solver); its prices start the subset bound and prune the MILP, and its own top-k selection, polished, is a
    further answer."""
    problem, cfg = run.problem, run.cfg
    t1 = time.perf_counter()
    dual = dual_bound(problem, run.at(1.0 if run.backend is None else _BOUND_SHARE),
                      target=run.best.value + cfg.mip_gap * abs(run.best.value))
    top_k = np.sort(np.argsort(-dual.g)[:problem.k])
    run.offer(_polish(problem, top_k, "lp-bound", run.at(1.0)))
    seconds = time.perf_counter() - t1
    run.say(f"qp: LP-Lagrangian bound {dual.value:.6f}, gap {rel_gap(run.best.value, dual.value):.3%} "
            f"({seconds:.1f}s)")
    run.dual, run.bound, run.bound_source = dual, dual.value, "lagrangian-lp"
    run.stats.update({"lagrangian_bound": dual.value, "bound_seconds": seconds})


def _subset_and_milp_phases(run: _Run) -> None:
    """Both exact-side phases, in the order that suits the instance. Small ones (F C <= milp._FULL_ENTRIES): the
    exact MILP first (unpruned, it usually closes the gap in seconds), until _SMALL_MILP_SHARE, then the subset bound
    until _SUBSET_SHARE. Larger ones: the subset bound until _SUBSET_SHARE (until _ILS_END_SHARE when the MILP
    cannot run anyway: too many columns for HiGHS/SCIP, or a share under _MIN_MILP_SECONDS), then the MILP."""
    problem, backend = run.problem, run.backend
    if problem.n_features * problem.n_classes <= _FULL_ENTRIES:
        _milp_phase(run, run.at(_SMALL_MILP_SHARE))
        _subset_phase(run, run.at(_SUBSET_SHARE))
        return
    assert run.dual is not None
    open_source = backend is not None and backend.name != "gurobi"
    lists = candidate_lists(problem, run.dual.u, run.best)
    too_big = open_source and sum(len(t) for t in lists) + len(problem.pw) > _MILP_MAX_COLUMNS
    # A MILP share below _MIN_MILP_SECONDS would be skipped anyway (60 s budgets: 9 s).
    no_room = open_source and (1 - _SUBSET_SHARE) * run.cfg.time_limit < _MIN_MILP_SECONDS
    _subset_phase(run, run.at(_ILS_END_SHARE if too_big or no_room else _SUBSET_SHARE))
    _milp_phase(run, run.at(1.0))


def _subset_phase(run: _Run, deadline: float) -> None:
    """The subset-Lagrangian bound (`subset_bound`, the penalty kept exact) from the LP-Lagrangian prices until
    `deadline`, if the gap is open and there is a penalty; every inner selection it meets is polished by local search
    and offered as an answer."""
    problem, cfg = run.problem, run.cfg
    if not run.open_gap() or not len(problem.pw) or time.perf_counter() >= deadline:
        return
    assert run.dual is not None
    t1 = time.perf_counter()

    def on_selection(sel: np.ndarray) -> float:
        # Each inner optimum is a good selection: polish it (a few seconds at most) and keep the best answer.
        return run.offer(_polish(problem, sel, "subset-bound", min(run.at(1.0), time.perf_counter() + 5.0)))

    inc = run.best
    sub = subset_bound(problem, run.dual.u, deadline, incumbent=inc.value, target=inc.value * (1 + cfg.mip_gap),
                       start=inc.selected, on_selection=on_selection)
    run.offer_bound(sub.value, f"lagrangian-subset-{sub.phase}")
    run.sub_info.update({"subset_bound": sub.value, "subset_iterations": sub.iterations, "subset_phase": sub.phase,
                         "subset_sdp_solves": sub.sdp_solves, "subset_seconds": time.perf_counter() - t1,
                         "subset_inner_seconds": sub.inner_seconds})
    run.say(f"qp: subset-Lagrangian bound {sub.value:.6f} ({sub.iterations} inner solves, best from the "
            f"{sub.phase.upper()} inner relaxation), answer {run.best.value:.6f}, "
            f"gap {rel_gap(run.best.value, run.bound):.3%} ({time.perf_counter() - t1:.1f}s)")


def _milp_phase(run: _Run, deadline: float) -> None:
    """The MILP (`milp.solve_milp`: pruned by the Lagrangian prices, lazy distinctness) until `deadline`, if the gap
    is open. Skipped for HiGHS/SCIP above _MILP_MAX_COLUMNS columns or with under _MIN_MILP_SECONDS left."""
    if not run.open_gap():
        return
    problem, backend = run.problem, run.backend
    assert backend is not None and run.dual is not None
    left = deadline - time.perf_counter()
    lists = candidate_lists(problem, run.dual.u, run.best)
    columns = sum(len(t) for t in lists) + len(problem.pw)
    if backend.name != "gurobi" and (columns > _MILP_MAX_COLUMNS or left < _MIN_MILP_SECONDS):
        # Measured (benchmarks/qp_research/qp_results.md): open-source simplex does not finish the root LP of a
        # model this size within minutes on 2 cores, so the time goes to the answer instead.
        why = f"{columns} columns" if columns > _MILP_MAX_COLUMNS else f"{left:.1f}s left"
        run.say(f"qp: MILP skipped ({why})")
        run.milp_info["milp_skipped"] = why
        return
    t1 = time.perf_counter()
    res = solve_milp(problem, run.best, backend, lists=lists, deadline=deadline, mip_gap=run.cfg.mip_gap,
                     log=run.say)
    run.rounds = res.rounds
    run.offer_bound(res.bound, f"milp-{backend.name}")
    if res.best is not None:
        run.offer(res.best)
        if "repair" in res.best.source:  # a repaired MILP selection may sit next to a better one
            run.offer(_polish(problem, res.best.selected, res.best.source, run.at(1.0)))
    run.milp_info.update({"milp_bound": res.bound, "milp_solves": res.solves, "milp_finished": res.finished,
                          "milp_seconds": time.perf_counter() - t1})


def _final_search_phase(run: _Run) -> None:
    """With an exact solver and the gap still open, iterated local search uses whatever time is left."""
    if run.open_gap() and time.perf_counter() < run.at(1.0):
        run.say("qp: iterated local search uses the remaining time")
        run.best = iterated_local_search(run.problem, run.best, run.at(1.0), rng=np.random.default_rng(1),
                                         max_kicks=10**6, patience=10**6)


def _certify(run: _Run, tau: float, sha256: str) -> Selection:
    """Re-check the answer against the problem (`certificate.verify`), check the bound is not below it (that would
    be a bug, not rounding), and state what is proven: gap, status and provenance."""
    problem, cfg, backend, best = run.problem, run.cfg, run.backend, run.best
    value = verify(problem, best.selected, best.assignment, best.value)
    if run.bound < value - _BOUND_SLACK * max(abs(value), 1.0):
        raise QPVerificationError(f"bound {run.bound!r} is below the objective {value!r}: the bound is invalid")
    bound = max(run.bound, value)
    gap = rel_gap(value, bound)
    status = _status(gap, cfg.mip_gap, exact=backend is not None)
    seconds = time.perf_counter() - run.t0
    run.say(f"qp: {status}: objective {value:.6f}, bound {bound:.6f}, gap {gap:.3%}, {seconds:.1f}s "
            f"(answer from {best.source}, bound from {run.bound_source})")
    n_pairs_all = problem.n_features * (problem.n_features - 1) // 2
    stats = {"answer_source": best.source, "bound_source": run.bound_source,
             "heuristic_objective": run.stats["heuristic_objective"], "lagrangian_bound": run.stats["lagrangian_bound"],
             "n_pairs": int(len(problem.pw)), "pairs_share": len(problem.pw) / max(n_pairs_all, 1),
             "heuristic_seconds": run.stats["heuristic_seconds"], "bound_seconds": run.stats["bound_seconds"],
             "redundancy_weight": problem.w, "redundancy_rule": cfg.redundancy_rule, "mip_gap": cfg.mip_gap,
             **run.sub_info, **run.milp_info}
    sel = best.selected.astype(np.int64)
    assignment = [list(fs) for fs in best.assignment]
    return Selection(selected=sel, assignment=assignment, weight=weight_matrix(sel, assignment), objective=value,
                     bound=bound, gap=gap, status=status, seconds=seconds,
                     solver=backend.name if backend else "heuristic",
                     solver_version=backend.version if backend else f"toolkit heuristic, numpy {np.__version__}",
                     tau=tau, lazy_rounds=run.rounds, input_sha256=sha256, stats=stats)
