"""Metrics of the pooled feature vectors: Class-Independence and Correlation (docs/method.md#metrics).

Both are computed, like in the reference, on the train set and only on the features the head uses
(`relevant_features`); which split and which columns to pass is the caller's choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.metrics._common import as_float, as_labels

# Guard of the reference's normalisations (ClassIndependence clamp and Correlation.sim_matrix eps).
EPS = 1e-8


def class_shares(features: Any, labels: Any, *, n_classes: int | None = None) -> np.ndarray:
    """Share of each feature's (min-shifted) activation mass that falls on each class.

    f'_nj = f_nj − min_n f_nj,   share_cj = Σ_{n: y_n = c} f'_nj / Σ_n f'_nj

    Args:
        features: pooled features, shape (N, F).
        labels: true classes, shape (N,).
        n_classes: number of classes C; defaults to max(labels) + 1.

    Returns:
        float64 array, shape (C, F); each column sums to 1, or is all 0 for a constant feature.
    """
    f = as_float(features, name="features", ndim=2)
    y = as_labels(labels, n=f.shape[0])
    if f.shape[0] == 0:
        raise ValueError("class shares of an empty set are undefined")
    n_classes = int(y.max() + 1 if n_classes is None else n_classes)
    shifted = f - f.min(axis=0, keepdims=True)
    per_class = np.zeros((n_classes, f.shape[1]))
    np.add.at(per_class, y, shifted)
    total = shifted.sum(axis=0)
    return np.where(total > 0, per_class / np.maximum(total, EPS), 0.0)


def class_independence(features: Any, labels: Any, *, n_classes: int | None = None) -> float:
    """Class-Independence: how little any single class owns a feature (higher is better).

    CI = 1 − mean_j max_c share_cj, with share_cj from `class_shares` (docs/method.md#metrics). A feature active for one
    class only has max share 1; a feature spread evenly over C balanced classes has max share 1/C. The value lies
    in [0, 1 − 1/C].

    Deviation from the reference (docs/method.md#metrics leaves 0/0 undefined): a constant (dead) feature has no mass to
    share; the reference clamps its denominator and thereby counts it as perfectly independent (share 0), which
    would reward dead features. Here constant features are left out of the mean; if every feature is constant the
    result is NaN.

    Args:
        features: pooled features, shape (N, F) (train set, used columns only, as in the reference code).
        labels: true classes, shape (N,).
        n_classes: number of classes C; defaults to max(labels) + 1.

    Returns:
        CI as a fraction.
    """
    f = as_float(features, name="features", ndim=2)
    shares = class_shares(f, labels, n_classes=n_classes)
    alive = np.ptp(f, axis=0) > 0
    if not alive.any():
        return float("nan")
    return float(1.0 - shares[:, alive].max(axis=0).mean())


def correlation(features: Any) -> float:
    """Correlation: mean over features of the largest uncentred cosine with any other feature (lower is better).

    C_ij = Σ_n f_ni f_nj / (max(‖f_i‖, eps) · max(‖f_j‖, eps)),  C_jj := 0,  Corr = mean_j max_i C_ij

    The cosine is uncentred and signed, and the zeroed diagonal takes part in the max, exactly as in the reference code
    (docs/method.md#metrics), so a feature anti-correlated with all others scores 0, not a negative value. The QPM model
    is scored on its raw pooled features, as the reference does; on the head's (f − μ)/σ the same formula would be
    close to the max Pearson correlation instead (x1 = (1, 2, 3), x2 = (3, 2, 1): 0.714 raw, 0 standardised).
    Orthogonal columns give 0, duplicated columns give 1.

    Args:
        features: pooled features, shape (N, F) with F ≥ 2 (train set, used columns only, as in the reference code).

    Returns:
        The correlation, in [0, 1].
    """
    f = as_float(features, name="features", ndim=2)
    if f.shape[1] < 2:
        raise ValueError("correlation needs at least two feature columns")
    unit = f / np.maximum(np.linalg.norm(f, axis=0, keepdims=True), EPS)
    cos = unit.T @ unit
    np.fill_diagonal(cos, 0.0)
    return float(cos.max(axis=0).mean())
