"""A certified upper bound without an LP solver: the Lagrangian dual of the linear relaxation, in closed form.

Relax distinctness (only removes constraints) and linearise each penalised pair with y_ij >= s_i + s_j - 1,
y >= 0. Dualising sum_f X[f, c] = m with prices u_c, X <= s with v >= 0 and the pair rows with mu_p in
[0, w R_p], and keeping sum_f s_f = k with s in [0, 1], gives for EVERY u in R^C and mu in that box

    UB(u, mu) = m * sum_c u_c + sum_p mu_p + (sum of the k largest g_f),
    g_f       = sum_c max(alpha A[f, c] - u_c, 0) - sum_{p containing f} mu_p,

an upper bound on the full problem (weak duality; the best v is max(alpha A - u, 0)). Its minimum equals the LP
bound of the F1 model (docs/method.md#qp) but needs no (F C)-row LP: on ImageNet size that LP did not finish in 5
minutes (benchmarks/qp_research/qp_results.md), while UB costs O(F C) per evaluation.

We minimise a smooth majorant (softplus for max(., 0) and an entropy-smoothed top-k, both >= the exact terms)
with L-BFGS-B at decreasing temperatures, and report the smallest *exact* UB seen. Validity never depends on
convergence: any (u, mu) evaluated exactly in float64 gives a valid bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, minimize
from scipy.special import expit

from toolkit.qp.problem import Problem

_TEMPERATURES = (0.01, 0.002, 4e-4, 1e-4, 3e-5)  # times alpha: the smoothing schedule (coarse to fine)
_CUTOFF = 30.0  # softplus(z) < 1e-13 * T below -30 T: entries further below their class price are skipped
_STAGE_ITERS = 120
_KEEP_GOING = 1e-6  # repeat the finest stage while it still lowers the bound by this (relative)
_PAIR_POOL = 4  # pairs get a multiplier when both ends are among the best _PAIR_POOL * k features


@dataclass(frozen=True, eq=False, kw_only=True)
class DualBound:
    """A valid upper bound and the multipliers that give it."""

    value: float
    u: np.ndarray  # (C,) class prices
    mu: np.ndarray  # (P,) pair multipliers in [0, w R_p]
    g: np.ndarray  # (F,) feature scores; the k largest form the Lagrangian's selection
    evaluations: int


def lagrangian_value(problem: Problem, u: np.ndarray, mu: np.ndarray) -> tuple[float, np.ndarray]:
    """Exact UB(u, mu) (valid for any u and any mu clipped to [0, w R_p]) and the feature scores g."""
    mu = np.clip(mu, 0.0, problem.pw)
    n = problem.n_features
    g = np.maximum(problem.alpha * problem.A - u, 0.0).sum(1)
    g -= np.bincount(problem.pi, mu, n) + np.bincount(problem.pj, mu, n)
    top = np.partition(g, n - problem.k)[n - problem.k:]
    return float(problem.m * u.sum() + mu.sum() + top.sum()), g


class _Smoothed:
    """Smooth majorant of UB at temperature T over the entries that matter, as a function of (u, mu[active]).

    Only entries with alpha A[f, c] > u_c - cutoff * T enter (a per-class prefix of the sorted columns), and only
    the pairs in `active` carry a multiplier (the others keep mu = 0, which is always valid).
    """

    def __init__(self, problem: Problem) -> None:
        self.p = problem
        aa = problem.alpha * problem.A
        self.order = np.argsort(-aa, axis=0, kind="stable")  # (F, C) features by value, per class
        self.sorted = np.take_along_axis(aa, self.order, 0)
        self.temperature = 1.0
        self.rows_cap = problem.n_features
        self.active = np.zeros(0, dtype=np.int64)
        self.calls = 0
        self.best = (np.inf, np.zeros(problem.n_classes), np.zeros(len(problem.pw)))
        self.h = np.zeros(problem.n_features)

    def full_mu(self, mu_active: np.ndarray) -> np.ndarray:
        mu = np.zeros(len(self.p.pw))
        mu[self.active] = mu_active
        return mu

    def __call__(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        p, t = self.p, self.temperature
        n, n_cls, k = p.n_features, p.n_classes, p.k
        u = z[:n_cls]
        mu = self.full_mu(z[n_cls:])
        self.calls += 1
        thr = u - _CUTOFF * t
        counts = (self.sorted[: self.rows_cap] > thr).sum(0)
        if counts.max() >= self.rows_cap and self.rows_cap < n:
            counts = (self.sorted > thr).sum(0)
        rows = max(int(counts.max()), 1)
        self.rows_cap = min(n, max(rows + rows // 4, 8))
        prefix = self.sorted[:rows]
        mask = prefix > thr
        cls = np.nonzero(mask)[1]
        idx = self.order[:rows][mask]
        diff = prefix[mask] - u[cls]  # compact: only the entries that can matter
        zz = diff / t
        e = np.exp(-np.minimum(np.abs(zz), 40.0))  # shared by softplus and the logistic (no denormals)
        pair = np.bincount(p.pi, mu, n) + np.bincount(p.pj, mu, n)
        h = np.bincount(idx, np.maximum(diff, 0.0) + t * np.log1p(e), n) - pair
        sig, smooth_top = _soft_top_k(h, k, t)
        self.h = h
        value = p.m * u.sum() + mu.sum() + smooth_top
        weight = np.where(zz >= 0, 1.0, e) / (1.0 + e) * sig[idx]
        a, b = p.pi[self.active], p.pj[self.active]
        grad = np.concatenate([p.m - np.bincount(cls, weight, n_cls), 1.0 - sig[a] - sig[b]])
        # The exact bound at this point comes from the same entries (those with alpha A <= u_c add 0).
        exact_h = np.bincount(idx, np.maximum(diff, 0.0), n) - pair
        exact = float(p.m * u.sum() + mu.sum() + np.partition(exact_h, n - k)[n - k:].sum())
        if exact < self.best[0]:
            self.best = (exact, u.copy(), mu)
        return float(value), grad


def _soft_top_k(h: np.ndarray, k: int, t: float) -> tuple[np.ndarray, float]:
    """max over sigma in [0,1]^F, sum sigma = k, of sigma.h + t * entropy(sigma): (argmax, value >= top-k sum)."""
    lo, hi = float(h.min()) - 40.0 * t, float(h.max()) + 40.0 * t
    for _ in range(64):  # bisection on the threshold so that the logistic weights sum to k
        mid = 0.5 * (lo + hi)
        if expit((h - mid) / t).sum() > k:
            lo = mid
        else:
            hi = mid
    sig = expit((h - 0.5 * (lo + hi)) / t)
    s = np.clip(sig, 1e-300, 1.0)
    c = np.clip(1.0 - sig, 1e-300, 1.0)
    entropy = -(sig * np.log(s) + (1.0 - sig) * np.log(c)).sum()
    return sig, float(sig @ h + t * entropy)


def dual_bound(problem: Problem, deadline: float, u0: np.ndarray | None = None, mu0: np.ndarray | None = None,
               target: float = -np.inf) -> DualBound:
    """Minimise UB(u, mu) until the schedule ends or `deadline` (a `time.perf_counter()` value) passes.

    Args:
        problem: the instance.
        deadline: stop starting new L-BFGS-B iterations after this time (one evaluation always happens).
        u0: (C,) starting prices; default alpha times each class's ceil(m F / k)-th best A.
        mu0: (P,) starting pair multipliers (a continuation); default 0.
        target: stop once the bound is at or below this (e.g. the incumbent: nothing left to prove).

    Returns:
        The best exact bound found, with its multipliers.
    """
    n, n_cls = problem.n_features, problem.n_classes
    fn = _Smoothed(problem)
    if u0 is None:
        rank = min(n, -(-problem.m * n // problem.k)) - 1
        u0 = fn.sorted[rank].copy()
    z = u0.copy()
    stages = list(_TEMPERATURES)
    stage = 0
    if mu0 is not None:  # continuing: start at the finest level with the given multipliers active
        stages, stage = [_TEMPERATURES[-1]] * 2, 1
        fn.active = np.flatnonzero(mu0 > 0)
        z = np.concatenate([z, mu0[fn.active]])
    fn.temperature = stages[0] * problem.alpha
    fn(z)
    while stage < len(stages) and time.perf_counter() < deadline and fn.best[0] > target:
        if stage == 1 and len(problem.pw) and mu0 is None:
            # Pair multipliers join after the first stage, and only where both ends score among the best
            # features: elsewhere the pair row is slack at the LP optimum and mu = 0 is optimal anyway.
            top = np.zeros(n, dtype=bool)
            top[np.argsort(-fn.h)[: min(n, _PAIR_POOL * problem.k)]] = True
            fn.active = np.flatnonzero(top[problem.pi] & top[problem.pj])
            z = np.concatenate([z[:n_cls], np.zeros(len(fn.active))])
        fn.temperature = stages[stage] * problem.alpha
        bounds = Bounds(np.concatenate([np.full(n_cls, -np.inf), np.zeros(len(fn.active))]),
                        np.concatenate([np.full(n_cls, np.inf), problem.pw[fn.active]]))

        def stop(_: np.ndarray) -> None:
            if time.perf_counter() >= deadline or fn.best[0] <= target:
                raise StopIteration  # scipy >= 1.11 ends the run and keeps the last iterate

        before = fn.best[0]
        res = minimize(fn, z, jac=True, method="L-BFGS-B", bounds=bounds, callback=stop,
                       options={"maxiter": _STAGE_ITERS, "maxcor": 8})
        z = res.x
        stage += 1
        if stage == len(stages) and before - fn.best[0] > _KEEP_GOING * abs(fn.best[0]):
            stages.append(stages[-1])  # time left and still improving: another round at the finest level
    value, u, mu = fn.best
    exact, g = lagrangian_value(problem, u, mu)  # recomputed on all entries: the number we certify
    return DualBound(value=exact, u=u, mu=np.clip(mu, 0.0, problem.pw), g=g, evaluations=fn.calls)
