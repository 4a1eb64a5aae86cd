"""benchmarks/qp_peers.py: our solver, HiGHS, SCIP and CP-SAT on the same QPM instance.

On the tiny instance (24 features, 8 classes, k = 10, m = 3; its optimum without distinctness repeats a class set,
so the peers' lazy distinctness loop runs) every solver must prove the optimum within a limit that never binds, all
four must agree on the objective scored by the one shared function, and every bound must lie on the maximisation's
side. The MILP the peers solve must score an answer exactly as `toolkit.qp.objective` does, and CP-SAT's rounding
correction must cover the rounding of any answer. benchmarks/ is a folder of scripts: the module is imported from
it by name so that the solver processes it spawns can import it too.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

# Appended, not first: benchmarks/serve.py must not shadow the `serve` package for the tests collected after this one.
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import qp_peers  # noqa: E402

from toolkit.qp import objective, problem_for  # noqa: E402
from toolkit.qp.problem import top_m_assignment  # noqa: E402


def _tiny_problem() -> tuple[qp_peers.Spec, object]:
    spec = qp_peers.make_specs(["tiny"], [], [], seed=0)[0]
    cfg = qp_peers.config_for(spec.rule, spec.R, 1.0, "highs", k=spec.k, m=spec.m)
    return spec, problem_for(spec.A, spec.R, cfg)


def _columns(milp: qp_peers.Milp, selected: np.ndarray, assignment: list[tuple[int, ...]]) -> np.ndarray:
    """The MILP column vector of an answer: s, x, and y_p = s_i s_j."""
    p = milp.p
    v = np.zeros(milp.n_cols)
    v[selected] = 1.0
    for c, fs in enumerate(assignment):
        v[milp.xcol[list(fs), c]] = 1.0
    v[milp.n + milp.n * milp.C:] = v[p.pi] * v[p.pj]
    return v


@pytest.mark.solver
def test_the_milp_and_cpsat_scaling_score_answers_as_the_shared_objective() -> None:
    """For random selections: the MILP's cost vector gives toolkit.qp.objective's value, decode inverts the column
    vector, and CP-SAT's integer objective / S is within its error allowance E of it (so bound / S + E is valid)."""
    _, problem = _tiny_problem()
    milp = qp_peers.Milp(problem)
    cpsat = qp_peers.CpSatBackend(milp, threads=1, mip_gap=1e-4)
    coef = np.round(milp.cost * cpsat.scale)
    assert 0 < cpsat.error < 1e-4
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(200):
        sel = np.sort(rng.choice(problem.n_features, problem.k, replace=False))
        assignment = top_m_assignment(problem, sel)
        v = _columns(milp, sel, assignment)
        exact = objective(problem, sel, assignment)
        assert float(milp.cost @ v) == pytest.approx(exact, rel=1e-12, abs=1e-9)
        worst = max(worst, abs(float(coef @ v) / cpsat.scale - exact))
        got_sel, got_assignment, _ = milp.decode(v)
        assert got_sel.tolist() == sel.tolist() and got_assignment == assignment
    assert worst <= cpsat.error


def test_a_bound_below_an_objective_raises() -> None:
    rows = [{"instance": "x", "solver": "ours", "objective": 10.0, "bound": 10.5, "time_limit": 60.0},
            {"instance": "x", "solver": "highs", "objective": None, "bound": 9.9, "time_limit": 60.0},
            {"instance": "y", "solver": "scip", "objective": 5.0, "bound": 5.0, "time_limit": 60.0}]
    with pytest.raises(RuntimeError, match="highs's bound .* below ours's objective"):
        qp_peers.check_sides(rows)
    rows[1]["bound"] = 10.0 - 1e-7  # within tolerance: accepted
    qp_peers.check_sides(rows)


@pytest.mark.solver
def test_every_solver_proves_the_tiny_instance_and_all_agree(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.json"
    qp_peers.main(["--instances", "tiny", "--time-limits", "300", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["solver"] for r in rows] == list(qp_peers.SOLVERS)
    objs = [r["objective"] for r in rows]
    assert all(o is not None for o in objs), rows
    top = max(objs)
    assert max(objs) - min(objs) <= 1e-6 * abs(top), objs
    for r in rows:
        assert r["status"] == "optimal", r
        assert r["bound"] is not None and math.isfinite(r["bound"])
        assert r["bound"] >= top - 1e-9 * abs(top), r  # an upper bound of the maximisation
        assert r["gap"] <= 1e-6, r
        assert r["seconds"] < r["time_limit"], r  # proven, not stopped by the limit
    assert all(r["rounds"] >= 1 for r in rows if r["solver"] != "ours"), "the lazy distinctness loop did not run"
    printed = capsys.readouterr().out
    assert "| tiny (24x8, k=10, m=3) |" in printed
    assert "verdict tiny @ 300s: our gap 0.0000% is the smallest" in printed
    assert "no peer found a better objective" in printed
