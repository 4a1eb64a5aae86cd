"""MILP backends behind cvxpy: which solver runs, its version, a warm start, and its proven bound.

* HiGHS (PyPI `highspy`) is the default and always available. cvxpy's HiGHS interface passes a start only from
  its own previous solve, so `_WarmHighs` (a cvxpy custom solver, the documented extension point) hands HiGHS the
  current variable values as a MIP start via `setSolution`.
* SCIP (`pip install pyscipopt`, the `scip` extra) is optional.
* Gurobi is used by `auto` only when cvxpy lists it and a tiny model solves (a licence check); never required.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass
from typing import Any

import cvxpy as cp
import numpy as np
from cvxpy import settings as cvx_settings
from cvxpy.reductions.solvers.conic_solvers.highs_conif import HIGHS
from cvxpy.reductions.solvers.utilities import stack_vals

from toolkit.qp._checks import QPSolverError


class _WarmHighs(HIGHS):
    """cvxpy's HiGHS interface plus a MIP start taken from the variables' `.value`."""

    def name(self) -> str:
        return "QPM_HIGHS"  # custom solvers must not reuse a built-in name

    def apply(self, problem: Any) -> tuple[dict, dict]:
        data, inv = super().apply(problem)
        data["init_value"] = stack_vals(problem.variables, np.nan)
        return data, inv

    def solve_via_data(self, data: dict, warm_start: bool, verbose: bool, solver_opts: dict,
                       solver_cache: dict | None = None) -> dict:
        import highspy

        start = data.get("init_value")
        cache = None
        if start is not None and len(start) == data[cvx_settings.A].shape[1] and np.isfinite(start).all():
            sol = highspy.HighsSolution()
            sol.col_value = np.asarray(start, dtype=np.float64)
            sol.value_valid = True
            # The parent passes a cached solution to HiGHS.setSolution; we hand it ours the same way.
            cache = {self.name(): (None, None, {"model_status": "kOptimal", "solution": sol})}
        return super().solve_via_data(data, cache is not None, verbose, solver_opts, cache)


@dataclass(frozen=True, kw_only=True)
class Backend:
    """A resolved MILP solver."""

    name: str  # highs | scip | gurobi
    version: str

    def solve(self, prob: cp.Problem, *, time_limit: float, mip_gap: float) -> None:
        """Solve `prob` in place with a time limit (seconds) and a relative gap; variables keep their start."""
        t = max(float(time_limit), 0.1)
        with warnings.catch_warnings():
            # cvxpy warns "solution may be inaccurate" at a time limit; the caller reads the status and verifies.
            warnings.simplefilter("ignore", UserWarning)
            self._solve(prob, t, mip_gap)

    def _solve(self, prob: cp.Problem, t: float, mip_gap: float) -> None:
        if self.name == "highs":
            prob.solve(solver=_WarmHighs(), verbose=False, time_limit=t, mip_rel_gap=mip_gap, random_seed=0)
        elif self.name == "scip":
            prob.solve(solver=cp.SCIP, verbose=False, scip_params={"limits/time": t, "limits/gap": mip_gap})
        else:
            prob.solve(solver=cp.GUROBI, verbose=False, warm_start=True, TimeLimit=t, MIPGap=mip_gap)

    def bound(self, prob: cp.Problem) -> float:
        """The solver's proven upper bound on the maximisation (inf when it reports none)."""
        stats = prob.solver_stats.extra_stats if prob.solver_stats is not None else None
        try:
            if self.name == "highs":
                value = -float(stats.mip_dual_bound)  # cvxpy minimises -objective; no constant offset is used
            elif self.name == "scip":
                value = -float(stats["model"].getDualbound())
            else:
                value = -float(stats.ObjBound)
        except Exception:  # a solver that stopped before its root LP has no bound to report
            return float("inf")
        return value if np.isfinite(value) else float("inf")


def _gurobi_usable() -> bool:
    if "GUROBI" not in cp.installed_solvers():
        return False
    try:
        import gurobipy

        with gurobipy.Env(params={"OutputFlag": 0}) as env, gurobipy.Model(env=env) as model:
            model.addVar()
            model.optimize()
        return True
    except Exception:
        return False


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def resolve_backend(name: str) -> Backend:
    """Map auto/highs/scip/gurobi to an installed, usable solver.

    Raises:
        QPSolverError: the requested solver is missing or unlicensed (the message says how to fix it).
    """
    installed = cp.installed_solvers()
    cvx = f"cvxpy {cp.__version__}"
    if name in ("auto", "gurobi"):
        if _gurobi_usable():
            import gurobipy

            return Backend(name="gurobi", version=f"{cvx}, Gurobi {'.'.join(map(str, gurobipy.gurobi.version()))}")
        if name == "gurobi":
            raise QPSolverError("solver 'gurobi' needs gurobipy with a valid licence (pip install gurobipy, then "
                                "a licence file); or use --solver highs (open source, the default)")
    if name == "scip":
        if "SCIP" not in installed:
            raise QPSolverError("solver 'scip' needs PySCIPOpt: pip install 'dinoqpm-toolkit[scip]' "
                                "(or pip install pyscipopt); or use --solver highs")
        return Backend(name="scip", version=f"{cvx}, PySCIPOpt {_version('pyscipopt')}")
    if "HIGHS" not in installed:
        raise QPSolverError("no MILP solver: HiGHS is missing (pip install highspy); --solver heuristic runs "
                            "without one")
    return Backend(name="highs", version=f"{cvx}, HiGHS {_version('highspy')}")
