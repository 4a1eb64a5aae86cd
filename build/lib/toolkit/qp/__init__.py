"""QPM discrete optimisation: choose k of F features and m per class, solved and certified without Gurobi.

The problem (exactly this objective; qpm.md §1.5 without the locality bias b):

    maximise   alpha * sum_{f,c} A[f,c] X[f,c]  -  w * sum_{i<j, R[i,j] >= tau} R[i,j] s_i s_j
    subject to sum_f s_f = k;   X[f,c] <= s_f;   sum_f X[f,c] = m for every class c;
               no two classes use the same set of features;   s, X binary;   alpha = 1000 / (m C).

A (F x C) is the Pearson feature-class correlation with max|A| = 1; R (F x F) is the cosine similarity between
rows of A with the diagonal and negatives set to 0 (read on its upper triangle); tau is the redundancy threshold
(default: the lowest one at which k pairwise-compatible features exist, qpm.md §3.3) and w its weight. Unlike the
reference, the penalty uses w * R directly, not R min-max rescaled over its nonzeros (qpm.md §1.2), and balance and
distinctness hold over all features, not only "relevant" ones (qpm.md §1.4).

Pipeline of `solve_qp`: pre-checks (`_checks`) -> tau (`threshold`) -> heuristic (`heuristic`, `assign`) ->
Lagrangian bound (`bound`) -> MILP through cvxpy with lazy distinctness and pruning (`milp`, `backends`) ->
verification and certificate (`certificate`). CLI: `python -m toolkit.qp --help`.
"""

from __future__ import annotations

from toolkit.qp._checks import QPInfeasibleError, QPInputError, QPSolverError, QPVerificationError
from toolkit.qp.certificate import Selection, check_structure, weight_matrix
from toolkit.qp.problem import Problem, build_problem, objective
from toolkit.qp.solve import solve_qp
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
    "solve_qp",
    "weight_matrix",
]
