"""QPM selection: MILP = brute force on tiny instances, valid bounds, feasible heuristic, checks, certificate, CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import toolkit.qp.milp as milp
from toolkit.config import ConfigError, QPConfig
from toolkit.qp import (
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
from toolkit.qp.inputs import save_inputs, similarity_R
from toolkit.qp.problem import duplicate_groups, top_m_assignment
from toolkit.qp.threshold import _largest_compatible, symmetric_upper

F, C, K, M = 10, 5, 5, 2


def _instance(seed: int, *, twins: bool) -> np.ndarray:
    """Random A; with `twins`, classes 0/1 and 2/3 have nearly equal columns, so their top-m sets collide."""
    rng = np.random.default_rng(seed)
    A = rng.uniform(-0.2, 1.0, (F, C))
    if twins:
        A[:, 1] = A[:, 0] + 0.02 * rng.random(F)
        A[:, 3] = A[:, 2] + 0.02 * rng.random(F)
    return A / np.abs(A).max()


def _brute_force(A: np.ndarray, R: np.ndarray, k: int, m: int, tau: float, w: float) -> tuple[float, bool]:
    """Exact optimum by enumerating every selection; for each, the best distinct assignment is an assignment
    problem between classes and all m-subsets of the selection. Also says whether distinctness binds."""
    p = build_problem(A, R, k=k, m=m, tau=tau, w=w)
    best, best_free = -math.inf, -math.inf
    for sel in itertools.combinations(range(A.shape[0]), k):
        subsets = list(itertools.combinations(sel, m))
        gain = np.array([[A[list(s), c].sum() for s in subsets] for c in range(A.shape[1])])
        rows, cols = linear_sum_assignment(gain, maximize=True)
        pen = p.penalty(np.array(sel))
        best = max(best, p.alpha * gain[rows, cols].sum() - pen)
        best_free = max(best_free, p.alpha * gain.max(1).sum() - pen)
    return best, best_free > best + 1e-9


def _cfg(**kw: object) -> QPConfig:
    base = {"n_features": K, "n_per_class": M, "time_limit": 20.0, "mip_gap": 0.0, "solver": "highs",
            "redundancy_rule": "single_scale"}  # the brute force below scores the single-scale rule
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
    A = _instance(6, twins=True)
    R = similarity_R(A)
    lines: list[str] = []
    sel = solve_qp(A, R, _cfg(redundancy_threshold=0.5, time_limit=3.0), log=lines.append)
    exact, _ = _brute_force(A, R, K, M, 0.5, 1.0)
    assert any("MILP skipped" in line for line in lines) and "milp_skipped" in sel.stats
    assert sel.objective <= exact + 1e-9 <= sel.bound + 1e-6
    assert sel.status in ("optimal", "time_limit") and sel.lazy_rounds == 0


@pytest.mark.parametrize("seed", range(6))
def test_heuristic_is_feasible_and_its_bound_is_valid(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_cls = [5, 10, 8, 10, 3, 6][seed]  # 10 = binomial(5, 2): every class set of the selection is used
    A = rng.uniform(-0.3, 1.0, (F, n_cls))
    A[:, 1] = A[:, 0]  # identical columns always collide under top-m
    R = similarity_R(A)
    sel = solve_qp(A, R, _cfg(solver="heuristic", time_limit=2.0, redundancy_threshold=0.6))
    assert sel.status == "heuristic" and sel.solver == "heuristic"
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
    A = _instance(4, twins=True)
    R = similarity_R(A)
    p = build_problem(A, R, k=K, m=M, tau=0.3, w=1.0)
    exact, _ = _brute_force(A, R, K, M, 0.3, 1.0)
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


def test_scip_and_gurobi_errors_say_how_to_fix() -> None:
    try:
        resolve_backend("scip")
    except QPSolverError as exc:
        assert "pyscipopt" in str(exc)
    else:
        pytest.skip("PySCIPOpt is installed")
    with pytest.raises(QPSolverError, match="unknown solver"):
        solve_qp(_instance(0, twins=False), None, type("Cfg", (), {**vars(_cfg()), "solver": "cplex"})())


@pytest.mark.solver
def test_scip_matches_brute_force_when_installed() -> None:
    pytest.importorskip("pyscipopt")
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
    assert json.loads((tmp_path / "y.json").read_text())["status"] == "heuristic"


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
