"""A stronger certified bound: dualise only the class rows and keep the redundancy penalty exact.

The LP of the penalty (y_ij >= s_i + s_j - 1) vanishes at fractional s, so every LP-based bound (`bound.py`, the
MILP's root) spreads s over many features and pays almost no penalty (docs/method.md#qp). Here only the class rows
sum_f X[f, c] = m (prices u) and the unused-feature links s_f <= sum_c X[f, c] (prices lam >= 0) are dualised; what
is left is, for EVERY u in R^C and lam in R^F_+,

    L(u, lam)   = m * sum_c u_c + max_{|S| = k} ( g(S) - penalty(S) ),
    g_f(u, lam) = sum_c max(alpha A[f, c] - u_c + lam_f, 0) - lam_f,

an upper bound on the full problem (weak duality; distinctness is dropped, which only removes constraints). The
inner problem is a k-subset problem with the exact pairwise penalty: F binaries and one linearised pair row per
penalised pair, no (F C) block, so HiGHS solves it by branch and bound in about a second at CUB size. Its Lagrangian
dual is as strong as the penalty convexified over k-subsets, not over the unit box.

We certify HiGHS's proven upper bound of the inner problem (valid also when it stops at its time limit), never its
incumbent, and lower L by Polyak subgradient steps on u from the LP-optimal prices of `bound.dual_bound`. The inner
optimum S of each step is also a good selection, handed back for the local search (the primal side).

Dense penalty graphs (at least 2 % of the pairs penalised, e.g. the clique rule at CUB size): HiGHS's root
bound of the plain inner model stays far above the inner optimum, and each solve takes seconds. The inner model
then gets clique inequalities of the penalty graph (`inner.clique_cut_rows`; valid for every binary s, so the inner
optimum is unchanged), which cut off the fractional points where the pair rows vanish, and the price steps run
first on the inner model's LP relaxation (a warm-started simplex; its bound is recomputed from the duals), then on
the lifted semidefinite relaxation of the inner problem from the best prices (`sdp_bound`; far stronger than the
LP or the MIP's root there), ending with one tighter solve at the best prices. Where the SDP does not fit (F above
`sdp_bound.MAX_FEATURES`), the MIP takes its place and the time left goes to one MIP solve at the best prices. Any
upper bound of the inner maximum (LP with valid cuts, the SDP's dual certificate, or the MIP's dual bound) keeps L
valid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from toolkit.qp.inner import InnerModel, penalty_cliques
from toolkit.qp.problem import Problem
from toolkit.qp.sdp_bound import SDP_EPS, TIGHT_EPS, InnerSDP, sdp_applies

_INNER_SECONDS = 10.0  # time limit of one inner solve (its proven bound is used even when it stops early)
_DENSE_SHARE = 0.02  # penalised share of all pairs from which the inner model gets clique cuts
_DENSE_INNER_SECONDS = 3.0  # inner time limit with clique cuts: the root (cuts included) gives nearly all the bound
_LP_SHARE = 0.6  # dense graphs: share of the subset bound's time for price steps on the inner LP relaxation
_LP_SHARE_SDP = 0.3  # the same when the SDP phase follows (its steps matter more: CUB q85, the SDP gives 323.5 at
# the LP phase's best prices and 319.8 after its own price steps)
_SDP_TIGHT_SHARE = 0.2  # of the SDP phase: the last solve, at the best prices and a tighter tolerance
_LP_STEP = 0.5  # first Polyak factor of the LP phase (1 overshoots: the incumbent is far below the bound there)
_MIP_STEP = 0.5  # Polyak factor when the MIP phase resumes from the LP phase's best prices
_OFFER_EVERY = 10  # LP phase: a rounded selection goes to `on_selection` at most every this many steps
_SAFETY = 1e-7  # relative margin added to the inner bound for HiGHS's feasibility tolerances
_STALL = 3  # iterations without a better bound before the step size shrinks
_LP_STALL = 2  # the same in the LP phase of dense graphs
_SHRINK = 0.6
_MIN_STEP = 1e-3  # Polyak factor below which the method has converged as far as it will


@dataclass(frozen=True, eq=False, kw_only=True)
class SubsetBound:
    """The best bound found, the prices that give it, and what the iterations did."""

    value: float  # valid upper bound on the full problem (inf if no inner solve finished its root)
    u: np.ndarray  # (C,) class prices of the best bound
    lam: np.ndarray  # (F,) link prices (>= 0) of the best bound
    iterations: int
    inner_seconds: float  # total time in the inner solves (HiGHS, SCS)
    phase: str  # which inner relaxation gave the best bound: "mip" (HiGHS branch and bound), "lp" or "sdp"
    sdp_solves: int  # inner solves of the lifted relaxation


def subset_bound(problem: Problem, u0: np.ndarray, deadline: float, *, incumbent: float, target: float,
                 start: np.ndarray | None = None, max_iterations: int = 10**9,
                 on_selection: Callable[[np.ndarray], float] | None = None) -> SubsetBound:
    """Minimise L(u) by Polyak subgradient steps until `deadline`, convergence, or L <= `target`.

    Phases (methods of `_PriceSteps`, each a run of price steps on one relaxation of the inner problem): sparse
    penalty graphs take `mip_phase` only (HiGHS's branch and bound). Dense ones (at least _DENSE_SHARE of the pairs
    penalised) take `lp_phase` (clique cuts, a warm simplex), then from its best prices `sdp_phase` (where F fits)
    or `mip_phase`, then `final_solve` at the best prices.

    Args:
        problem: the instance.
        u0: (C,) starting class prices (the LP-optimal ones of `bound.dual_bound`).
        deadline: `time.perf_counter()` value after which no new inner solve starts.
        incumbent: value of the best known answer (the Polyak target level; raised by `on_selection`).
        target: stop once the bound is at or below this (nothing left to prove).
        start: (k,) a selection used as the first MIP start of the inner problem.
        max_iterations: upper limit on inner solves (1: just L(u0)).
        on_selection: called with each new inner selection; returns the value of the best answer known after it
            (e.g. after a local search from that selection), which sharpens the step size.

    Returns:
        The smallest L(u, lam) proven, with its prices.
    """
    steps = _PriceSteps(problem, u0, deadline, incumbent=incumbent, target=target, start=start,
                        max_iterations=max_iterations, on_selection=on_selection)
    if not steps.dense:
        steps.mip_phase()
    elif (lp_ended := steps.lp_phase()) is not None:
        steps.restart_from_best()
        if steps.sdp is not None:
            if steps.sdp_phase(lp_ended):
                steps.final_solve("sdp")
        elif steps.mip_phase(resumed=True):
            steps.final_solve("mip")
    return steps.result()


class _PriceSteps:
    """The Polyak subgradient steps of `subset_bound` on (u, lam), one inner relaxation ("mode") per phase:
    "mip" (`InnerModel.solve`), "lp" (`InnerModel.lp_solve`) or "sdp" (`InnerSDP.solve`). Keeps the current prices, the
    best bound with its prices, and the step size."""

    def __init__(self, problem: Problem, u0: np.ndarray, deadline: float, *, incumbent: float, target: float,
                 start: np.ndarray | None, max_iterations: int,
                 on_selection: Callable[[np.ndarray], float] | None) -> None:
        p = self.p = problem
        self.deadline, self.target, self.max_iterations = deadline, target, max_iterations
        self.incumbent, self.on_selection = incumbent, on_selection
        self.aa = p.alpha * p.A
        self.u = np.asarray(u0, dtype=np.float64).copy()
        self.lam_f = np.zeros(p.n_features)
        n_all = p.n_features * (p.n_features - 1) // 2
        self.dense = len(p.pw) >= _DENSE_SHARE * max(n_all, 1)
        # Dense penalty graphs: HiGHS's root bound of the plain inner model stays far above its optimum (measured at
        # fixed prices on the CUB q95 instance: 349.8 after 10 s, 348.0 after 180 s, incumbent 345.8); with clique
        # cuts the inner LP alone gives 347.4 in 0.1 s (346.7 with three clique passes), so many more steps fit.
        cliques = penalty_cliques(p, np.maximum(self.aa - self.u, 0.0).sum(1)) if self.dense else None
        self.inner = InnerModel(p, cliques)
        # Dense graphs where it fits: after the LP phase, the price steps run on the lifted (semidefinite)
        # relaxation of the inner problem, far stronger there than the LP or HiGHS's branch and bound (sdp_bound).
        self.sdp = InnerSDP(p) if self.dense and sdp_applies(p) else None
        self.inner_limit = _DENSE_INNER_SECONDS if self.dense else _INNER_SECONDS
        self.best, self.best_u, self.best_lam, self.best_phase = math.inf, self.u.copy(), self.lam_f.copy(), "mip"
        self.sdp_solves, self.it, self.spent, self.last_offer = 0, 0, 0.0, -_OFFER_EVERY
        self.lam, self.stall = (_LP_STEP if self.dense else 1.0), 0  # Polyak factor, steps without a better bound
        self.seen: set[bytes] = set()
        self.sel = None if start is None else np.sort(np.asarray(start, dtype=np.int64))  # the next MIP start

    def going(self) -> bool:
        """Whether another inner solve may start: iterations and time left, and the bound still above target."""
        return self.it < self.max_iterations and time.perf_counter() < self.deadline and self.best > self.target

    def run(self, mode: str, end: float, *, resumed: bool = False) -> float | None:
        """Price steps in `mode` until the phase ends: the step size has converged or `end` (a perf_counter value)
        has passed. `resumed`: the previous phase ended within this same round of checks, so the first step runs
        without checking again.

        Returns:
            The time at which the phase ended, or None when the whole bound stops (out of iterations or time, at
            target, no selection, or the relaxation's optimum reached).
        """
        while resumed or self.going():
            now = time.perf_counter()
            if not resumed and (self.lam <= _MIN_STEP or now >= end):
                return now
            resumed = False
            outcome = self.step(mode)
            if outcome == "stop":
                return None
            if outcome == "exhausted":
                end = 0.0  # the LP relaxation is exhausted at these prices: the next phase takes over
        return None

    def mip_phase(self, *, resumed: bool = False) -> bool:
        """Price steps with HiGHS's branch and bound on the inner model until the step size has converged: all of
        the bound on sparse graphs; on dense ones where the SDP does not fit, after the LP phase (`resumed`).
        Returns whether it converged with time left (then a final solve may follow)."""
        return self.run("mip", math.inf, resumed=resumed) is not None

    def lp_phase(self) -> float | None:
        """Dense graphs, first: price steps on the inner model's LP relaxation (clique cuts included), a
        warm-started simplex that takes 0.1-2 s where the MIP's root takes 2-10 s, so the prices converge, for
        _LP_SHARE of the time left (_LP_SHARE_SDP when the SDP phase follows). Returns when it ended, or None when
        the whole bound stops there."""
        share = _LP_SHARE_SDP if self.sdp is not None else _LP_SHARE
        return self.run("lp", time.perf_counter() + share * max(self.deadline - time.perf_counter(), 0.0))

    def sdp_phase(self, since: float) -> bool:
        """Dense graphs where F fits, after the LP phase (which ended at `since`): price steps on the lifted
        semidefinite relaxation of the inner problem, leaving _SDP_TIGHT_SHARE of the time for the final solve.
        Returns whether it ended with time left for that solve."""
        end = self.deadline - _SDP_TIGHT_SHARE * max(self.deadline - since, 0.0)
        return self.run("sdp", end, resumed=True) is not None

    def restart_from_best(self) -> None:
        """Start the next phase from the best prices so far, with the Polyak factor _MIP_STEP."""
        self.u, self.lam_f, self.lam, self.stall = self.best_u.copy(), self.best_lam.copy(), _MIP_STEP, 0

    def final_solve(self, mode: str) -> None:
        """Dense graphs, last: one inner solve at the best prices, as the steps have converged (or their time is
        up). The SDP at the tighter tolerance, warm-started (CUB q85: 1.6 units lower there, 323.5 -> 321.9), or the
        MIP with all the time left, whose branch and bound can only lower the bound there."""
        self.u, self.lam_f = self.best_u.copy(), self.best_lam.copy()
        if mode == "mip":
            self.inner_limit = self.deadline - time.perf_counter()
        self.step(mode, final=True)

    def inner_solve(self, mode: str, g: np.ndarray, final: bool) -> tuple[float, np.ndarray | None,
                                                                          np.ndarray | None]:
        """Upper bound of the inner maximum at scores g (F,) by the mode's relaxation: (bound, selection (k,) or
        None, its weights (F,) in [0, 1] or None: fractional s for "lp" and "sdp", the 0/1 selection for "mip")."""
        p, t = self.p, time.perf_counter()
        if mode == "mip":
            ub, found = self.inner.solve(g, self.sel, min(self.inner_limit, self.deadline - t))
            weights = None
            if found is not None:
                weights = np.zeros(p.n_features)
                weights[found] = 1.0
            return ub, found, weights
        if mode == "lp":
            ub, weights = self.inner.lp_solve(g, self.deadline - t)
        else:
            assert self.sdp is not None
            ub, weights = self.sdp.solve(g, self.deadline - t, eps=TIGHT_EPS if final else SDP_EPS)
            self.sdp_solves += 1
        # A fractional s: its k largest entries are the selection handed on.
        found = None if weights is None else np.sort(np.argsort(-weights)[: p.k]).astype(np.int64)
        return ub, found, weights

    def step(self, mode: str, *, final: bool = False) -> str:
        """One inner solve at the current prices and the Polyak step from it.

        Returns:
            "next" (stepped), "retry" (a dense MIP solve stopped before any information: the next gets twice the
            time at the same prices), "exhausted" (LP phase: every dualised row holds at these prices) or "stop"
            (the final solve, no selection to step from, or a zero subgradient).
        """
        p = self.p
        over = self.aa - self.u + self.lam_f[:, None]  # (F, C)
        g = np.maximum(over, 0.0).sum(1) - self.lam_f
        t = time.perf_counter()
        ub, found, weights = self.inner_solve(mode, g, final)
        if mode == "mip" and self.dense and (found is None or ub >= np.sort(g)[-p.k:].sum() - 1e-9):
            # Stopped before its root LP (or any incumbent): no information. Give the next solve more time at the
            # same prices, with this selection (if any) as its start.
            self.inner_limit *= 2.0
            self.sel = self.sel if found is None else found
            self.spent += time.perf_counter() - t
            return "retry"
        self.spent += time.perf_counter() - t
        self.it += 1
        value = p.m * float(self.u.sum()) + ub + _SAFETY * (abs(ub) + 1.0)
        if final:
            if value < self.best:
                self.best, self.best_phase = value, mode
            if found is not None and self.on_selection is not None and found.tobytes() not in self.seen:
                self.on_selection(found)
            return "stop"
        if value < self.best:
            self.best, self.best_u, self.best_lam, self.best_phase = value, self.u.copy(), self.lam_f.copy(), mode
            self.stall = 0
        else:
            self.stall += 1
            if self.stall >= (_LP_STALL if mode != "mip" else _STALL):
                self.lam, self.stall = self.lam * _SHRINK, 0
        if found is None or weights is None:
            return "stop"  # no selection, no subgradient (the inner solve ran out of time before any incumbent)
        self.sel = found  # the next MIP start (in the LP phase: the rounded LP optimum)
        self.offer(found, mode)
        return self.move(over, weights, value, mode)

    def offer(self, found: np.ndarray, mode: str) -> None:
        """Hand a new inner selection to `on_selection` (in the LP phase at most every _OFFER_EVERY steps)."""
        key = found.tobytes()
        if (self.on_selection is not None and key not in self.seen
                and (mode != "lp" or self.it - self.last_offer >= _OFFER_EVERY)):
            self.seen.add(key)
            self.last_offer = self.it
            self.incumbent = max(self.incumbent, self.on_selection(found))

    def move(self, over: np.ndarray, weights: np.ndarray, value: float, mode: str) -> str:
        """The Polyak step on (u, lam) from the inner optimum s = `weights` (F,) (fractional in the LP and SDP
        phases), `over` (F, C) being alpha A - u + lam at the current prices."""
        p = self.p
        # Subgradients of L at s: for u_c, m minus the s-weighted count of features that beat the class's price;
        # for lam_f, s_f times (how many classes would take f minus 1), projected onto lam >= 0.
        act = np.flatnonzero(weights > 1e-9)
        hit = (over[act] > 0) * weights[act, None]  # (|act|, C)
        sg_u = p.m - hit.sum(0)
        sg_l = np.zeros(p.n_features)
        sg_l[act] = hit.sum(1) - weights[act]
        sg_l[(self.lam_f <= 0) & (sg_l > 0)] = 0.0  # lam cannot go below 0
        norm = float((sg_u**2).sum() + (sg_l**2).sum())
        if norm == 0.0:
            # Every dualised row holds with equality: L is the optimum of this relaxation (in the LP phase, the
            # SDP or the MIP goes on from here).
            return "exhausted" if mode == "lp" else "stop"
        step = self.lam * max(value - self.incumbent, 0.0) / norm
        self.u = self.u - step * sg_u
        self.lam_f = np.maximum(self.lam_f - step * sg_l, 0.0)
        return "next"

    def result(self) -> SubsetBound:
        """The best bound found and the prices that give it."""
        return SubsetBound(value=self.best, u=self.best_u, lam=self.best_lam, iterations=self.it,
                           inner_seconds=self.spent, phase=self.best_phase, sdp_solves=self.sdp_solves)
