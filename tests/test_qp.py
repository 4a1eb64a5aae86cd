"""QPM selection: MILP = brute force on tiny instances, valid bounds, feasible heuristic, checks, certificate, CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import toolkit.qp.milp as milp
from toolkit.config import ConfigError, QPConfig
from toolkit.qp import (
    Problem,
    QPInfeasibleError,
    QPInputError,
    QPSolverError,
    QPVerificationError,
    Selection,
    build_problem,
    check_structure,
    choose_tau,
    objective,
    solve_qp,
)
from toolkit.qp.__main__ import main
from toolkit.qp._checks import check_inputs
from toolkit.qp.assign import distinct_assignment
from toolkit.qp.backends import resolve_backend
from toolkit.qp.bound import lagrangian_value
from toolkit.qp.certificate import verify
from toolkit.qp.inner import InnerModel, clique_cut_rows, penalty_cliques
from toolkit.qp.inputs import save_inputs, similarity_R
from toolkit.qp.problem import duplicate_groups, top_m_assignment, unused_features
from toolkit.qp.sdp_bound import InnerSDP
from toolkit.qp.subset_bound import subset_bound
from toolkit.qp.threshold import _largest_compatible, reference_pairs, symmetric_upper

F, C, K, M = 10, 5, 5, 2


def _instance(seed: int, *, twins: bool) -> np.ndarray:
    """Random A; with `twins`, classes 0/1 and 2/3 have nearly equal columns, so their top-m sets collide."""
    rng = np.random.default_rng(seed)
    A = rng.uniform(-0.2, 1.0, (F, C))
    if twins:
        A[:, 1] = A[:, 0] + 0.02 * rng.random(F)
        A[:, 3] = A[:, 2] + 0.02 * rng.random(F)
    return A / np.abs(A).max()


def _best_covering(gain: np.ndarray, subsets: list[tuple[int, ...]], sel: tuple[int, ...]) -> float:
    """Best distinct assignment that uses every feature of `sel`, by an ILP over (class, subset) pairs (a model
    unrelated to the solver's: one subset per class, each subset at most once, each feature covered)."""
    from scipy.optimize import Bounds, LinearConstraint
    from scipy.optimize import milp as scipy_milp

    n_cls, n_sub = gain.shape
    one_each = np.kron(np.eye(n_cls), np.ones(n_sub))
    at_most_once = np.kron(np.ones(n_cls), np.eye(n_sub))
    covers = np.array([[f in fs for fs in subsets] for f in sel], dtype=float)
    cover = np.kron(np.ones(n_cls), covers)
    res = scipy_milp(-gain.ravel(), integrality=np.ones(gain.size), bounds=Bounds(0, 1),
                     constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(at_most_once, 0, 1),
                                  LinearConstraint(cover, 1, np.inf)])
    return -res.fun if res.status == 0 else -math.inf


def _brute_force(A: np.ndarray, R: np.ndarray, k: int, m: int, tau: float, w: float,
                 link: bool = True, reference: bool = False, fixed: dict[int, int] | None = None) -> tuple[float, bool]:
    """Exact optimum by enumerating every selection (only those with feature f selected iff fixed[f] = 1); for each,
    the best distinct assignment is an assignment problem between classes and all m-subsets of the selection, and,
    when that leaves a selected feature unused (and `link`), an ILP that also covers every feature. Also says
    whether distinctness binds."""
    p = (reference_pairs(R, k, tau).problem(A, k=k, m=m, w=w) if reference
         else build_problem(A, R, k=k, m=m, tau=tau, w=w))
    best, best_free = -math.inf, -math.inf
    for sel in itertools.combinations(range(A.shape[0]), k):
        if any((f in sel) != bool(v) for f, v in (fixed or {}).items()):
            continue
        subsets = list(itertools.combinations(sel, m))
        gain = np.array([[A[list(s), c].sum() for s in subsets] for c in range(A.shape[1])])
        rows, cols = linear_sum_assignment(gain, maximize=True)
        pen = p.penalty(np.array(sel))
        value = gain[rows, cols].sum()
        if link and set(sel) - {f for j in cols for f in subsets[j]}:
            value = _best_covering(gain, subsets, sel)
        best = max(best, p.alpha * value - pen)
        best_free = max(best_free, p.alpha * gain.max(1).sum() - pen)
    return best, best_free > best + 1e-9


def _problem_and_optimum(seed: int, tau: float, w: float) -> tuple[Problem, float]:
    """The twins instance of `seed` as a Problem (threshold tau, weight w) and its brute-force optimum."""
    A = _instance(seed, twins=True)
    R = similarity_R(A)
    return build_problem(A, R, k=K, m=M, tau=tau, w=w), _brute_force(A, R, K, M, tau, w)[0]


# A time limit that never decides a test: on these instances (10 features, 5 classes) every phase of solve_qp ends on
# its own (the heuristic after its kicks, the LP bound at its last stage, the MILP once it has proven the optimum, in
# well under a second), so "optimal" is decided by the certificate, however slow the machine. The limit only stops a
# broken solver from running for ever; tests that want a short run (the heuristic's) pass their own and assert only
# what holds at any time limit (feasibility, a valid bound).
_NEVER_BINDS = 3600.0


def _cfg(**kw: object) -> QPConfig:
    base = {"n_features": K, "n_per_class": M, "time_limit": _NEVER_BINDS, "mip_gap": 0.0, "solver": "highs",
            "redundancy_rule": "clique"}  # the brute force below scores the clique rule
    return QPConfig(**{**base, **kw})


CASES = [(0, True, None, 1.0), (1, True, 0.5, 2.0), (2, False, 0.3, 1.0), (3, True, 0.9, 0.5)]


@pytest.mark.solver
@pytest.mark.parametrize(("seed", "twins", "tau", "w"), CASES)
def test_milp_matches_brute_force(seed: int, twins: bool, tau: float | None, w: float) -> None:
    A = _instance(seed, twins=twins)
    R = similarity_R(A)
    sel = solve_qp(A, R, _cfg(redundancy_threshold=tau, redundancy_weight=w))
    exact, binds = _brute_force(A, R, K, M, sel.tau, w)
    assert sel.status == "optimal"
    assert sel.objective == pytest.approx(exact, rel=1e-6, abs=1e-6)
    assert sel.bound >= exact - 1e-6 and sel.gap <= 1e-5
    check_structure(sel.selected, [tuple(fs) for fs in sel.assignment], k=K, m=M, n_features=F)
    if twins:  # the instance is built so that the distinctness-free optimum collides
        assert binds


def _link_instance(seed: int) -> np.ndarray:
    """3 classes that all prefer features 0-2: without the link two of the five selected features stay unused."""
    rng = np.random.default_rng(seed)
    A = rng.uniform(0.0, 0.2, (7, 3))
    A[:3] += 0.7
    return A / A.max()


@pytest.mark.solver
@pytest.mark.parametrize("seed", range(3))
def test_unused_feature_link_changes_the_optimum_and_milp_matches_brute_force(seed: int) -> None:
    A = _link_instance(seed)
    R = similarity_R(A)
    tau = [1.1, 0.999, 0.99][seed]
    linked, _ = _brute_force(A, R, 5, 2, tau, 1.0)
    free, _ = _brute_force(A, R, 5, 2, tau, 1.0, link=False)
    assert free > linked + 1e-3  # the link binds on these instances
    for solver in ("highs", "heuristic"):
        # The heuristic's LP bound ignores the link, so its gap stays open and it uses its whole (short) budget; only
        # what holds at any budget is asserted for it. HiGHS proves the optimum long before its limit (_NEVER_BINDS).
        limit = _NEVER_BINDS if solver == "highs" else 2.0
        sel = solve_qp(A, R, _cfg(n_features=5, n_per_class=2, redundancy_threshold=tau, solver=solver,
                                  time_limit=limit))
        used = {f for fs in sel.assignment for f in fs}
        assert used == set(sel.selected.tolist())  # export keeps exactly the head's features
        assert (sel.weight.sum(0) >= 1).all()
        assert sel.objective <= linked + 1e-9 <= sel.bound + 1e-6
        if solver == "highs":
            assert sel.objective == pytest.approx(linked, rel=1e-6) and sel.status == "optimal"


@pytest.mark.solver
def test_reference_rule_doubles_tau_rescales_the_penalty_and_matches_brute_force() -> None:
    A = _instance(3, twins=True)
    R = similarity_R(A)
    sel = solve_qp(A, R, _cfg(redundancy_rule="reference"))
    assert sel.tau == pytest.approx(2 * choose_tau(R, K).tau)
    p = reference_pairs(R, K, sel.tau).problem(A, k=K, m=M, w=1.0)
    r = R[np.triu_indices(F, 1)]
    lo, hi = r[r > 0].min(), r.max()
    np.testing.assert_allclose(p.pw, (R[p.pi, p.pj] - lo) / (hi - lo))  # min-max over R's nonzeros
    exact, _ = _brute_force(A, R, K, M, sel.tau, 1.0, reference=True)
    assert sel.objective == pytest.approx(exact, rel=1e-6) and sel.status == "optimal"
    with pytest.raises(QPInputError, match="redundancy_rule"):
        solve_qp(A, R, type("Cfg", (), {**vars(_cfg()), "redundancy_rule": "turan"})())  # past config validation


def test_distinct_assignment_covers_every_selected_feature() -> None:
    A = _link_instance(0)
    p = build_problem(A, np.zeros((7, 7)), k=5, m=2, tau=1.0, w=0.0)
    sel = np.array([0, 1, 2, 5, 6])
    assert unused_features(sel, top_m_assignment(p, sel))  # plain top-m leaves features 5 and 6 unused
    res = distinct_assignment(p, sel)
    assert not unused_features(sel, res.assignment) and not duplicate_groups(res.assignment)
    assert res.loss == pytest.approx(p.topm_value(sel) - objective(p, sel, res.assignment), rel=1e-9)
    lazy = [(0, 1), (0, 2), (1, 2)]  # distinct, but features 5 and 6 serve no class
    with pytest.raises(QPVerificationError, match=r"\[5, 6\] are used by no class"):
        verify(p, sel, lazy, objective(p, sel, lazy))


@pytest.mark.solver
def test_subset_bound_is_valid_and_no_weaker_than_the_lp_bound() -> None:
    p, exact = _problem_and_optimum(4, tau=0.3, w=1.0)
    rng = np.random.default_rng(1)
    for _ in range(5):  # any prices give a valid bound, also after a few subgradient steps
        u = rng.normal(0.3, 0.5, C) * p.alpha
        sub = subset_bound(p, u, math.inf, incumbent=exact - 1.0, target=-math.inf, max_iterations=15)
        assert sub.value >= exact - 1e-7 and sub.iterations >= 1
        # At the same prices the exact penalty can only lower the bound below the LP one (mu = 0 there).
        one = subset_bound(p, u, math.inf, incumbent=exact, target=-math.inf, max_iterations=1)
        assert one.iterations == 1 and one.value <= lagrangian_value(
            p, u, np.zeros(len(p.pw)))[0] + 1e-6


@pytest.mark.solver
def test_clique_cuts_keep_the_inner_optimum_and_its_lp_bound_valid() -> None:
    """The inner problem max_{|S| = k} g(S) - penalty(S) with clique cuts, against brute force over all k-subsets:
    the MIP finds the exact optimum, the LP relaxation's bound (recomputed from duals) is never below it, and the
    cuts are tight at some binary point (they are not trivially slack)."""
    rng = np.random.default_rng(7)
    n, k = 10, 4
    A = rng.uniform(0.0, 1.0, (n, 3))
    R = np.triu(rng.uniform(0.0, 1.0, (n, n)), 1)
    p = build_problem(A / A.max(), R, k=k, m=1, tau=0.45, w=1.0)  # about half of the pairs: large cliques
    cliques = penalty_cliques(p, rng.random(n))
    pairs = set(zip(p.pi.tolist(), p.pj.tolist(), strict=True))
    assert cliques and max(len(q) for q in cliques) >= 4
    assert all((int(a), int(b)) in pairs for q in cliques for a, b in itertools.combinations(q, 2))
    rows, cols, vals, lower = clique_cut_rows(p, cliques)
    subsets = [np.array(s) for s in itertools.combinations(range(n), k)]
    tight = False
    for s in subsets:  # every binary point with y = s_i s_j satisfies every cut
        x = np.zeros(n + len(p.pw))
        x[s] = 1.0
        x[n:] = x[p.pi] * x[p.pj]
        lhs = np.bincount(rows, vals * x[cols], len(lower))
        assert (lhs >= lower - 1e-12).all()
        tight |= bool(np.isclose(lhs, lower).any())
    assert tight
    inner = InnerModel(p, cliques)
    assert inner.n_cuts == len(lower)
    for _ in range(4):
        g = rng.normal(1.0, 0.8, n)
        exact = max(float(g[s].sum()) - p.penalty(s) for s in subsets)
        lp_ub, frac = inner.lp_solve(g, 60.0)
        assert frac is not None and lp_ub >= exact - 1e-9
        ub, sel = inner.solve(g, None, 60.0)
        assert sel is not None and ub >= exact - 1e-7
        assert float(g[sel].sum()) - p.penalty(sel) == pytest.approx(exact, abs=1e-7)


@pytest.mark.solver
def test_sdp_inner_bound_is_valid_for_any_duals_and_stronger_than_the_lp() -> None:
    """The lifted relaxation of the inner problem (sdp_bound), against brute force over all k-subsets on dense
    graphs (about 70 % of the pairs penalised): its certificate is never below the inner optimum, also for random
    dual values (weak duality, no solver tolerance involved), and it leaves much less above the optimum than the LP
    with clique cuts (measured on these seeds: 0.15 against 1.71 in total)."""
    n, k = 16, 6
    subsets = [np.array(s) for s in itertools.combinations(range(n), k)]
    sdp_excess = lp_excess = 0.0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        A = rng.uniform(0.0, 1.0, (n, 3))
        R = np.triu(rng.uniform(0.0, 1.0, (n, n)), 1)
        p = build_problem(A, R, k=k, m=1, tau=0.3, w=0.5)
        assert len(p.pw) >= 0.6 * n * (n - 1) / 2
        inner, sdp = InnerModel(p, penalty_cliques(p, rng.random(n))), InnerSDP(p)
        g = rng.normal(1.0, 0.3, n)
        exact = max(float(g[s].sum()) - p.penalty(s) for s in subsets)
        ub, s = sdp.solve(g, 30.0)
        assert ub >= exact - 1e-9
        assert s.shape == (n,) and s.sum() == pytest.approx(k, abs=1e-2)
        for _ in range(5):  # any duals certify a valid (if loose) bound
            assert sdp.certify(sdp.cost(g), rng.normal(size=sdp.n_eq), rng.normal(size=sdp.n_pair)) >= exact - 1e-9
        lp_ub, _ = inner.lp_solve(g, 60.0)
        sdp_excess += ub - exact
        lp_excess += lp_ub - exact
    assert lp_excess > 1.0 and sdp_excess < 0.25 * lp_excess


@pytest.mark.solver
def test_dense_subset_bound_stays_valid() -> None:
    """Most pairs penalised (clique cuts, LP phase, then the lifted relaxation): the bound stays above the
    brute-force optimum."""
    p, exact = _problem_and_optimum(2, tau=0.0, w=0.3)
    assert len(p.pw) >= 0.5 * F * (F - 1) / 2
    rng = np.random.default_rng(2)
    for _ in range(3):
        u = rng.normal(0.3, 0.5, C) * p.alpha
        sub = subset_bound(p, u, math.inf, incumbent=exact - 1.0, target=-math.inf, max_iterations=30)
        assert sub.value >= exact - 1e-7 and sub.iterations >= 1
        # Run to convergence (about 50 steps, well under a second here): the LP phase, then the lifted relaxation.
        sub = subset_bound(p, u, time.perf_counter() + 600.0, incumbent=exact - 1.0, target=-math.inf)
        assert sub.sdp_solves >= 1 and sub.value >= exact - 1e-7


@pytest.mark.solver
def test_status_names_what_was_proven() -> None:
    A = _instance(1, twins=True)
    R = similarity_R(A)
    exact = solve_qp(A, R, _cfg(redundancy_threshold=0.5))
    assert exact.status == "optimal" and exact.gap <= 1e-6
    loose = solve_qp(A, R, _cfg(redundancy_threshold=0.5, solver="heuristic", mip_gap=0.9))
    assert loose.status in ("optimal", "within_gap") and loose.gap <= 0.9
    assert loose.status == ("optimal" if loose.gap <= 1e-6 else "within_gap")


@pytest.mark.solver
def test_lazy_rounds_break_duplicates_from_the_milp(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the heuristic's help (a weak start), the first MILP answer has colliding classes; cuts must fix it.
    A = _instance(0, twins=True)
    R = similarity_R(A)
    p = build_problem(A, R, k=K, m=M, tau=1.1, w=1.0)
    start = milp.repaired(p, np.arange(K), "start")
    lists = milp.candidate_lists(p, None, start)
    res = milp.solve_milp(p, start, resolve_backend("highs"), lists=lists, deadline=math.inf, mip_gap=0.0,
                          log=lambda _: None)
    exact, binds = _brute_force(A, R, K, M, 1.1, 1.0)
    assert binds and res.rounds >= 1 and res.finished
    assert res.best is not None and res.best.value == pytest.approx(exact, rel=1e-9)
    assert not duplicate_groups(res.best.assignment)


@pytest.mark.solver
def test_pruned_model_with_overflow_still_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(milp, "_FULL_ENTRIES", 0)  # force per-class candidate lists plus the overflow certificate
    rng = np.random.default_rng(7)
    A = rng.uniform(0, 1, (12, 4))
    A /= A.max()
    R = similarity_R(A)
    p = build_problem(A, R, k=4, m=2, tau=0.97, w=1.0)
    start = milp.repaired(p, np.arange(4), "start")
    u = np.full(4, p.alpha * 0.99)  # high prices: tiny candidate lists, so the overflow must grow them
    lists = milp.candidate_lists(p, u, start)
    assert sum(map(len, lists)) < 12 * 4
    res = milp.solve_milp(p, start, resolve_backend("highs"), lists=lists, deadline=math.inf, mip_gap=0.0,
                          log=lambda _: None)
    exact, _ = _brute_force(A, R, 4, 2, 0.97, 1.0)
    assert res.best is not None and res.best.value == pytest.approx(exact, rel=1e-9)
    assert res.bound >= exact - 1e-6


@pytest.mark.solver
def test_oversized_milp_is_skipped_and_the_bound_continues(monkeypatch: pytest.MonkeyPatch) -> None:
    import toolkit.qp.solve as solve_mod

    monkeypatch.setattr(solve_mod, "_MILP_MAX_COLUMNS", 0)
    monkeypatch.setattr(solve_mod, "_SUBSET_SHARE", 0.0)  # no time for the subset bound: the gap stays open
    A = _instance(6, twins=True)
    R = similarity_R(A)
    lines: list[str] = []
    sel = solve_qp(A, R, _cfg(redundancy_threshold=0.5, time_limit=3.0), log=lines.append)
    exact, _ = _brute_force(A, R, K, M, 0.5, 1.0)
    assert any("MILP skipped" in line for line in lines) and "milp_skipped" in sel.stats
    assert sel.objective <= exact + 1e-9 <= sel.bound + 1e-6
    assert sel.status in ("optimal", "within_gap", "time_limit") and sel.lazy_rounds == 0


@pytest.mark.parametrize("seed", range(6))
def test_heuristic_is_feasible_and_its_bound_is_valid(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_cls = [5, 10, 8, 10, 3, 6][seed]  # 10 = binomial(5, 2): every class set of the selection is used
    A = rng.uniform(-0.3, 1.0, (F, n_cls))
    A[:, 1] = A[:, 0]  # identical columns always collide under top-m
    R = similarity_R(A)
    sel = solve_qp(A, R, _cfg(solver="heuristic", time_limit=2.0, redundancy_threshold=0.6))
    assert sel.solver == "heuristic"
    assert sel.status == ("optimal" if sel.gap <= 1e-6 else "heuristic")  # mip_gap 0: nothing else is proven
    check_structure(sel.selected, [tuple(fs) for fs in sel.assignment], k=K, m=M, n_features=F)
    p = build_problem(A, R, k=K, m=M, tau=0.6, w=1.0)
    assert sel.objective == pytest.approx(objective(p, sel.selected, [tuple(f) for f in sel.assignment]))
    exact, _ = _brute_force(A, R, K, M, 0.6, 1.0)
    assert sel.objective <= exact + 1e-9 <= sel.bound + 1e-6
    assert sel.weight.shape == (n_cls, K) and sel.weight.dtype == np.float32
    assert (sel.weight.sum(1) == M).all()


def test_distinct_assignment_repairs_collisions_near_the_exact_optimum() -> None:
    rng = np.random.default_rng(11)
    A = rng.uniform(0, 1, (8, 6))
    A[:, 1] = A[:, 2] = A[:, 0]  # three identical classes all want the same top pair
    p = build_problem(A, np.zeros((8, 8)), k=5, m=2, tau=1.0, w=0.0)
    sel = np.array([0, 2, 3, 5, 7])
    res = distinct_assignment(p, sel)
    assert not duplicate_groups(res.assignment) and res.colliding >= 3
    subsets = list(itertools.combinations(sel.tolist(), 2))
    gain = np.array([[A[list(fs), c].sum() for fs in subsets] for c in range(6)])
    rows, cols = linear_sum_assignment(gain, maximize=True)
    exact = p.alpha * gain[rows, cols].sum()
    got = objective(p, sel, res.assignment)
    assert got == pytest.approx(exact, rel=1e-12)  # identical classes: their three best subsets, exactly
    assert res.loss == pytest.approx(p.topm_value(sel) - got, rel=1e-9)
    assert res.class_loss.sum() == pytest.approx(res.loss)


def test_lagrangian_bound_is_valid_for_any_multipliers() -> None:
    p, exact = _problem_and_optimum(4, tau=0.3, w=1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        u = rng.normal(0.3, 0.5, C) * p.alpha
        mu = rng.uniform(0, 1, len(p.pw)) * p.pw
        assert lagrangian_value(p, u, mu)[0] >= exact - 1e-9


def test_choose_tau_on_a_known_structure() -> None:
    # Three pairs of near-duplicates (0.9) and weak links elsewhere (0.1): three compatible features exist only
    # below 0.9 -- one per pair -- so tau is the next distinct value above 0.1, and exactly the pairs are penalised.
    R = np.full((6, 6), 0.1)
    for i in (0, 2, 4):
        R[i, i + 1] = R[i + 1, i] = 0.9
    np.fill_diagonal(R, 0)
    th = choose_tau(R, 3)
    assert th.tau == pytest.approx(0.9)
    assert sorted(th.compatible // 2) == [0, 1, 2]
    p = build_problem(np.ones((6, 2)), R, k=3, m=1, tau=th.tau, w=1.0)
    assert sorted(zip(p.pi.tolist(), p.pj.tolist(), strict=True)) == [(0, 1), (2, 3), (4, 5)]


def test_choose_tau_is_the_lowest_threshold_the_greedy_accepts() -> None:
    rng = np.random.default_rng(3)
    R = similarity_R(rng.normal(size=(30, 6)))
    th = choose_tau(R, 8)
    sub = R[np.ix_(th.compatible, th.compatible)]
    assert len(th.compatible) == 8 and (sub < th.tau).all()
    values = np.unique(R[np.triu_indices(30, 1)])
    lower = values[values < th.tau]
    # The bisection's invariant: the grid value just below tau was probed and the greedy failed there.
    assert len(lower) and len(_largest_compatible(symmetric_upper(R), float(lower[-1]), 8)) < 8


@pytest.mark.parametrize(("kw", "exc", "words"), [
    ({"n_features": 11}, QPInfeasibleError, "exceeds the F=10"),
    ({"n_features": 3, "n_per_class": 3}, QPInfeasibleError, "binomial(3, 3) = 1"),
    ({"n_features": 10, "n_per_class": 1}, QPInfeasibleError, "use at most 5 < k=10"),
])
def test_infeasible_settings_raise_before_solving(kw: dict, exc: type, words: str) -> None:
    A = _instance(0, twins=False)
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        solve_qp(A, None, _cfg(**kw))


def test_bad_inputs_raise_clear_errors() -> None:
    A = _instance(0, twins=False)
    bad = A.copy()
    bad[2, 1] = np.nan
    with pytest.raises(QPInputError, match="non-finite"):
        solve_qp(bad, None, _cfg())
    with pytest.raises(QPInputError, match="must be \\(F, F\\)"):
        solve_qp(A, np.zeros((F, F + 1)), _cfg())
    with pytest.raises(QPInputError, match="negative"):
        solve_qp(A, -np.ones((F, F)), _cfg())
    with pytest.raises(QPInputError, match="2-D"):
        solve_qp(A[0], None, _cfg())
    with pytest.raises(ConfigError):  # m > k is already refused by the config
        QPConfig(n_features=2, n_per_class=3)
    loose = type("Cfg", (), {"n_features": 2, "n_per_class": 3, "redundancy_threshold": None})()
    with pytest.raises(QPInfeasibleError, match="n_per_class m=3"):
        check_inputs(A, None, loose)


def test_selection_json_round_trip_and_verification() -> None:
    A = _instance(5, twins=True)
    sel = solve_qp(A, None, _cfg(solver="heuristic", time_limit=1.0))
    back = Selection.from_json(sel.to_json())
    np.testing.assert_array_equal(back.selected, sel.selected)
    assert back.assignment == sel.assignment
    np.testing.assert_array_equal(back.weight, sel.weight)
    for f in ("objective", "bound", "gap", "status", "solver", "tau", "lazy_rounds", "input_sha256"):
        assert getattr(back, f) == getattr(sel, f)
    assert sel.weight[0, list(sel.selected).index(sel.assignment[0][0])] == 1.0
    d = json.loads(sel.to_json())
    d["assignment"][1] = d["assignment"][0]
    with pytest.raises(QPVerificationError, match="same feature set"):
        Selection.from_json(json.dumps(d))
    p = build_problem(A, similarity_R(A), k=K, m=M, tau=sel.tau, w=1.0)
    assignment = [tuple(fs) for fs in sel.assignment]
    with pytest.raises(QPVerificationError, match="differs"):
        verify(p, sel.selected, assignment, sel.objective + 1e-3)
    assert top_m_assignment(p, sel.selected)[0] == tuple(sorted(top_m_assignment(p, sel.selected)[0]))
    no_bound = dataclasses.replace(sel, stats={**sel.stats, "milp_bound": math.inf})  # a MILP without a bound
    assert json.loads(no_bound.to_json())["stats"]["milp_bound"] is None


@pytest.mark.solver
def test_auto_uses_an_open_source_solver_without_gurobi() -> None:
    backend = resolve_backend("auto")
    assert backend.name in ("highs", "gurobi")
    assert "cvxpy" in backend.version


def test_scip_and_gurobi_errors_say_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a machine without PySCIPOpt (the dev extra installs it, so hide it from cvxpy's solver list).
    import cvxpy

    installed = [s for s in cvxpy.installed_solvers() if s != "SCIP"]
    monkeypatch.setattr(cvxpy, "installed_solvers", lambda: installed)
    with pytest.raises(QPSolverError, match="pyscipopt"):
        resolve_backend("scip")
    with pytest.raises(QPSolverError, match="unknown solver"):
        solve_qp(_instance(0, twins=False), None, type("Cfg", (), {**vars(_cfg()), "solver": "cplex"})())


@pytest.mark.solver
def test_scip_matches_brute_force() -> None:
    A = _instance(1, twins=True)
    R = similarity_R(A)
    sel = solve_qp(A, R, _cfg(solver="scip", redundancy_threshold=0.5))
    exact, _ = _brute_force(A, R, K, M, 0.5, 1.0)
    assert sel.solver == "scip" and sel.objective == pytest.approx(exact, rel=1e-6)


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return ["--inputs", str(tmp_path / "x.npz"), "--n-features", "5", "--n-per-class", "2", "--time-limit", "5",
            "--quiet", "--out", str(tmp_path / "y.json"), *extra]


@pytest.mark.solver
def test_cli_writes_the_answer_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    A = _instance(2, twins=True)
    save_inputs(tmp_path / "x.npz", A)  # no R: computed from A
    assert main(_cli(tmp_path, "--solver", "highs")) == 0
    d = json.loads((tmp_path / "y.json").read_text())
    for key in ("selected", "assignment", "objective", "bound", "gap", "status", "seconds", "solver", "tau",
                "input_sha256"):
        assert key in d
    assert len(d["selected"]) == 5 and len(d["assignment"]) == C and all(len(a) == 2 for a in d["assignment"])
    assert d["bound"] >= d["objective"] and d["solver"] == "highs"
    assert main(_cli(tmp_path)) == 2
    assert "--force" in capsys.readouterr().err
    assert main(_cli(tmp_path, "--force", "--solver", "heuristic")) == 0
    d = json.loads((tmp_path / "y.json").read_text())
    assert d["solver"] == "heuristic" and d["status"] in ("heuristic", "within_gap", "optimal")


def test_cli_bad_inputs_exit_non_zero_with_a_fix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.savez(tmp_path / "x.npz", B=np.zeros(3))
    assert main(_cli(tmp_path)) == 2
    assert "no 'A'" in capsys.readouterr().err
    save_inputs(tmp_path / "x.npz", _instance(0, twins=False))
    args = _cli(tmp_path)
    args[args.index("--n-features") + 1] = "3"
    args[args.index("--n-per-class") + 1] = "3"
    assert main(args) == 2
    assert "binomial" in capsys.readouterr().err
    args = _cli(tmp_path)
    args[args.index("--n-features") + 1] = "0"
    assert main(args) == 2
    assert "--n-features" in capsys.readouterr().err
    assert not (tmp_path / "y.json").exists()
