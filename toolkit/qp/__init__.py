"""QPM discrete optimisation: choose k of F features and m per class, solved and certified without Gurobi.

The problem (exactly this objective; docs/method.md#qp, the QPM problem of Norrenbrock et al., ICLR 2025, without the
locality bias b):

    maximise   alpha * sum_{f,c} A[f,c] X[f,c]  -  w * sum_{i<j, R[i,j] >= tau} R[i,j] s_i s_j
    subject to sum_f s_f = k;   X[f,c] <= s_f;   sum_f X[f,c] = m for every class c;   s_f <= sum_c X[f,c];
               no two classes use the same set of features;   s, X binary;   alpha = 1000 / (m C).

A (F x C) is the Pearson feature-class correlation with max|A| = 1; R (F x F) is the cosine similarity between
rows of A with the diagonal and negatives set to 0 (read on its upper triangle); tau is the redundancy threshold
(default: the lowest one at which k pairwise-compatible features exist, docs/method.md#qp) and w its weight.
qp.redundancy_rule picks how tau and the penalty are made: `reference` (the default, as the reference code: tau
searched on R + R^T but compared with R, negative cosines kept, penalty R min-max rescaled over its nonzeros) or
`clique` (tau and penalty w * R on R itself). Unlike the reference, balance and distinctness hold over all features,
not only "relevant" ones, and every selected feature serves some class (docs/method.md, differences from the
reference code).

Pipeline of `solve_qp`: pre-checks (`_checks`) -> tau (`threshold`) -> heuristic (`heuristic`, `assign`) ->
LP-Lagrangian bound (`bound`) -> subset-Lagrangian bound with the penalty kept exact, whose inner selections also
feed the local search (`subset_bound`, its inner problem a HiGHS model in `inner`; on dense penalty graphs also
bounded by a semidefinite relaxation, `sdp_bound`) -> MILP through cvxpy with lazy distinctness and pruning (`milp`,
`backends`) if a gap is left -> verification and certificate (`certificate`). CLI: `python -m toolkit.qp --help`.
"""

from __future__ import annotations

from toolkit.qp._checks import QPInfeasibleError, QPInputError, QPSolverError, QPVerificationError
from toolkit.qp.certificate import Selection, check_structure, weight_matrix
from toolkit.qp.problem import Problem, build_problem, objective
from toolkit.qp.solve import problem_for, solve_qp
from toolkit.qp.threshold import choose_tau

__all__ = [
    "Problem",
    "QPInfeasibleError",
    "QPInputError",
    "QPSolverError",
    "QPVerificationError",
    "Selection",
    "build_problem",
    "check_structure",
    "choose_tau",
    "objective",
    "problem_for",
    "solve_qp",
    "weight_matrix",
]
