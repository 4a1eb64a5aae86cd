"""Research code beside the benchmarks (benchmarks/qp_research/): the floor of the subset bound, `joint_bound`.

The product never calls it (too slow for `solve_qp`), but the figures in benchmarks/qp_research/qp_results.md rest on
it, so it is tested like the library: against brute force on tiny instances. It is loaded from its file, as
`python benchmarks/qp_research/qp_floor.py` does (benchmarks/ is a folder of scripts, not a package).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from test_qp import C, F, K, M, _brute_force, _instance  # the tiny twins instances and their exact optimum

from toolkit.qp import build_problem
from toolkit.qp.inputs import similarity_R
from toolkit.qp.sdp_bound import InnerSDP

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "qp_research" / "joint_bound.py"
_spec = importlib.util.spec_from_file_location("qp_research_joint_bound", _PATH)
assert _spec is not None and _spec.loader is not None
research = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = research  # registered before it runs: its dataclasses look their module up there
_spec.loader.exec_module(research)


@pytest.mark.solver
def test_joint_bound_is_valid_at_every_node_and_below_the_priced_bound() -> None:
    """The lifted relaxation with the class part kept (the floor of the subset bound's SDP price steps): never below
    the brute-force optimum, at the root and with features fixed in or out, and never above the subset bound's value
    at any prices (Lagrangian duality), so it measures how far price steps can go."""
    A = _instance(2, twins=True)
    R = similarity_R(A)
    p = build_problem(A, R, k=K, m=M, tau=0.0, w=0.3)  # dense: every positive cosine is a penalised pair
    for fixed in ({}, {0: 1}, {0: 0}, {3: 1, 7: 0}):
        node = research.joint_bound(p, fixed=fixed)
        exact = _brute_force(A, R, K, M, 0.0, 0.3, fixed=fixed)[0]
        assert node.status == "solved" and node.value >= exact - 1e-7
        assert node.s.sum() == pytest.approx(K, abs=1e-2)
        assert all(node.s[f] == pytest.approx(v, abs=1e-3) for f, v in fixed.items())
    root, sdp = research.joint_bound(p), InnerSDP(p)

    def priced(u: np.ndarray, lam: np.ndarray) -> float:  # subset_bound's L(u, lam) with the SDP inner bound
        g = np.maximum(p.alpha * p.A - u + lam[:, None], 0.0).sum(axis=1) - lam
        return p.m * float(u.sum()) + sdp.solve(g, 30.0, eps=1e-6)[0]

    rng = np.random.default_rng(0)
    for _ in range(3):
        assert priced(rng.normal(0.3, 0.3, C) * p.alpha, rng.uniform(0.0, 20.0, F)) >= root.value - 1e-3
    # At the joint optimum's duals the price steps would reach the floor itself (measured: equal to 1e-3).
    assert priced(root.u, root.lam) == pytest.approx(root.value, abs=1e-2)
