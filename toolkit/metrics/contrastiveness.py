"""Contrastiveness: how cleanly each feature splits into "off" and "on" (docs/method.md#metrics).

Per feature a two-component 1-D Gaussian mixture is fitted to its pooled activations, and the overlap coefficient
of the two fitted normals (mixture weights ignored) is taken; Contrastiveness = 1 − mean overlap.

The reference fits sklearn's `GaussianMixture` without a random_state, so its numbers change between runs
(docs/method.md#differences).
Here the EM is a small numpy implementation, vectorised over features, whose first start is
deterministic: the exact (globally optimal) 1-D 2-means split of the sorted column. Further starts (`n_init > 1`)
use responsibilities drawn from `np.random.default_rng(seed)`; the start with the highest log-likelihood wins per
feature. Reruns with the same inputs and seed therefore agree bit for bit, and each column is fitted as if alone
(converged columns are frozen while the rest of their block iterates). The loop, the stopping rule and the
variance floor copy sklearn's `GaussianMixture.fit` (E-step then M-step per iteration, stop after the iteration
whose mean log-likelihood moved by less than tol 1e-3, max_iter 100, reg_covar 1e-6 added to every variance): from
the same start, the fitted parameters are sklearn's to float rounding (tests/test_metrics.py).
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np

from toolkit.metrics._common import as_float

# Features are fitted in blocks of this many columns to bound the (N, block, 2) temporaries.
_BLOCK = 64
_LOG_2PI = float(np.log(2.0 * np.pi))


def _two_means_init(x: np.ndarray, reg_covar: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mixture parameters from the optimal 2-means split of each column (sorted prefix sums, O(N log N)).

    Args:
        x: shape (N, B), N ≥ 2.

    Returns:
        weights, means, variances, each shape (B, 2).
    """
    n = x.shape[0]
    xs = np.sort(x - x.mean(axis=0), axis=0)  # centring keeps the prefix-sum variances accurate
    c1, c2 = np.cumsum(xs, axis=0), np.cumsum(xs**2, axis=0)
    left = np.arange(1, n, dtype=np.float64)[:, None]  # split after row i-1: i points left, n-i right
    s1, s2 = c1[:-1], c2[:-1]
    t1, t2 = c1[-1] - s1, c2[-1] - s2
    sse = (s2 - s1**2 / left) + (t2 - t1**2 / (n - left))
    split = np.argmin(sse, axis=0)  # ties: the first (smallest left group), deterministic
    cols = np.arange(x.shape[1])
    n_left = split + 1.0
    n_right = n - n_left
    sum_l, sq_l = s1[split, cols], s2[split, cols]
    sum_r, sq_r = t1[split, cols], t2[split, cols]
    means = np.stack([sum_l / n_left, sum_r / n_right], axis=1)
    var = np.stack([sq_l / n_left, sq_r / n_right], axis=1) - means**2
    weights = np.stack([n_left, n_right], axis=1) / n
    return weights, means + x.mean(axis=0)[:, None], np.maximum(var, 0.0) + reg_covar


def _m_step(x: np.ndarray, resp: np.ndarray, reg_covar: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum-likelihood mixture parameters for responsibilities `resp` (N, B, 2) of columns `x` (N, B)."""
    nk = resp.sum(axis=0) + 10 * np.finfo(np.float64).eps  # sklearn's guard against empty components
    means = np.einsum("nbk,nb->bk", resp, x) / nk
    var = np.einsum("nbk,nbk->bk", resp, (x[:, :, None] - means[None]) ** 2) / nk + reg_covar
    return nk / x.shape[0], means, var


def _e_step(x: np.ndarray, weights: np.ndarray, means: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Responsibilities (N, B, 2) and mean log-likelihood per column (B,)."""
    log_joint = np.log(weights)[None] - 0.5 * (_LOG_2PI + np.log(var)[None] + (x[:, :, None] - means[None]) ** 2
                                               / var[None])
    top = log_joint.max(axis=2, keepdims=True)
    log_norm = top + np.log(np.exp(log_joint - top).sum(axis=2, keepdims=True))
    return np.exp(log_joint - log_norm), log_norm[:, :, 0].mean(axis=0)


def _run_em(x: np.ndarray, params: tuple[np.ndarray, np.ndarray, np.ndarray], *, max_iter: int, tol: float,
            reg_covar: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """EM from `params` with scikit-learn's loop: each iteration is an E-step (its mean log-likelihood is the
    "lower bound") followed by an M-step, and a column stops after the iteration whose lower bound changed by less
    than `tol` from the previous one (or after max_iter M-steps). So the parameters returned are one M-step past the
    last likelihood evaluation, exactly as `GaussianMixture.fit`; the returned log-likelihood is that last lower
    bound, which sklearn also uses to pick the best of several starts.

    Converged columns are frozen, so a column's fit does not depend on which other columns share its block.
    """
    weights, means, var = params
    ll = np.full(x.shape[1], -np.inf)
    active = np.ones(x.shape[1], dtype=bool)
    for _ in range(max_iter):
        resp, new_ll = _e_step(x, weights, means, var)
        new = _m_step(x, resp, reg_covar)
        weights, means, var = (np.where(active[:, None], n, o) for n, o in zip(new, (weights, means, var)))
        with np.errstate(invalid="ignore"):  # -inf - -inf never happens: the first bound is finite
            done = np.abs(new_ll - ll) < tol
        ll = np.where(active, new_ll, ll)
        active &= ~done
        if not active.any():
            break
    return weights, means, var, ll


def fit_gmm_1d(features: Any, *, seed: int = 0, n_init: int = 1, max_iter: int = 100, tol: float = 1e-3,
               reg_covar: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fits an independent two-component 1-D Gaussian mixture to every column by EM.

    Args:
        features: shape (N, F), N ≥ 2.
        seed: seeds the random starts 2..n_init (the first start is deterministic).
        n_init: number of starts; the one with the highest log-likelihood is kept per column.
        max_iter: EM iterations per start.
        tol: a column stops once its mean log-likelihood changes by less than this (sklearn's rule).
        reg_covar: added to each variance (absolute, as in sklearn), so a constant column stays finite.

    Returns:
        weights, means, variances of the two components, each shape (F, 2).
    """
    x_all = as_float(features, name="features", ndim=2)
    if x_all.shape[0] < 2:
        raise ValueError("a two-component mixture needs at least two samples")
    rng = np.random.default_rng(seed)
    out = [np.empty((x_all.shape[1], 2)) for _ in range(3)]
    for start in range(0, x_all.shape[1], _BLOCK):
        cols = slice(start, min(x_all.shape[1], start + _BLOCK))
        x = x_all[:, cols]
        best = _run_em(x, _two_means_init(x, reg_covar), max_iter=max_iter, tol=tol, reg_covar=reg_covar)
        for _ in range(n_init - 1):
            resp = rng.uniform(size=(*x.shape, 2))
            resp /= resp.sum(axis=2, keepdims=True)
            cand = _run_em(x, _m_step(x, resp, reg_covar), max_iter=max_iter, tol=tol, reg_covar=reg_covar)
            better = cand[3] > best[3]
            best = tuple(np.where(better[:, None], c, b) if c.ndim == 2 else np.where(better, c, b)
                         for c, b in zip(cand, best))
        for dst, src in zip(out, best[:3]):
            dst[cols] = src
    return out[0], out[1], out[2]


def gaussian_overlap(means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """Overlap coefficient ∫ min(N(μ1, σ1²), N(μ2, σ2²)) dx of each pair of normals, via statistics.NormalDist.

    Args:
        means: shape (F, 2).
        variances: shape (F, 2), all > 0.

    Returns:
        float64 array, shape (F,), values in [0, 1].
    """
    sd = np.sqrt(variances)
    return np.array([NormalDist(m[0], s[0]).overlap(NormalDist(m[1], s[1])) for m, s in zip(means, sd)])


def contrastiveness(features: Any, *, seed: int = 0, n_init: int = 1) -> float:
    """Contrastiveness = 1 − mean_j OVL_j, where OVL_j is the overlap of feature j's two fitted mixture normals.

    Following the reference code (docs/method.md#metrics), the mixture weights are ignored in the overlap, so a
    feature whose values form two well separated modes scores near 1 and a unimodal feature, whose two fitted
    components sit on top of each other, scores low. Unlike the reference, the fit is seeded and deterministic (see
    module doc), and there is no cut-off above 1000 features.

    Args:
        features: pooled features, shape (N, F) (train set, used columns only, as in the reference code).
        seed: seed of the EM's random restarts (only used when n_init > 1).
        n_init: EM starts per feature.

    Returns:
        Contrastiveness as a fraction in [0, 1].
    """
    _, means, variances = fit_gmm_1d(features, seed=seed, n_init=n_init)
    return float(1.0 - gaussian_overlap(means, variances).mean())
