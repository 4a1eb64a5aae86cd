"""SID@k, the spatial diversity of a prediction's top-k feature maps (docs/method.md#metrics, "SumNMax").

For each image the k features with the largest weight in the predicted class's row are taken; each map is divided
by its mean absolute value and turned into a spatial distribution by a softmax over positions; SID@k is the mass
of the pointwise maximum of these k distributions, divided by k. It lies in [1/k, 1]: 1/k when the k maps are
identical, 1 when they peak at disjoint positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.metrics._common import as_float, as_labels, as_maps, chunks

# Floor of the mean-|M| normaliser, as in the reference's `diversity.py`.
MEAN_ABS_FLOOR = 1e-5


def spatial_softmax(maps: np.ndarray) -> np.ndarray:
    """Softmax over the positions of mean-|M|-normalised maps.

    P_j = softmax_p(M_j / max(mean_p |M_j(p)|, 1e-5))

    Args:
        maps: shape (..., h, w).

    Returns:
        float64 array, shape (..., h, w); each map sums to 1.
    """
    m = np.asarray(maps, dtype=np.float64)
    flat = m.reshape(*m.shape[:-2], -1)
    flat = flat / np.maximum(np.abs(flat).mean(axis=-1, keepdims=True), MEAN_ABS_FLOOR)
    flat = np.exp(flat - flat.max(axis=-1, keepdims=True))
    return (flat / flat.sum(axis=-1, keepdims=True)).reshape(m.shape)


def top_k_features(head_weight: Any, predictions: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k largest weights of each prediction's class row, and which rows have ≥ k nonzero weights.

    The ranking uses the raw (signed) weights, as the reference's `topk` does (docs/method.md#metrics). Ties are
    broken by the lower feature index (stable sort); with a binary QPM row of exactly k ones the set is the k assigned
    features whatever the tie rule.

    Args:
        head_weight: shape (C, F).
        predictions: predicted classes, shape (N,).
        k: number of features per image.

    Returns:
        indices, int64 shape (N, min(k, F)); eligible, bool shape (N,).
    """
    w = as_float(head_weight, name="head_weight", ndim=2)
    pred = as_labels(predictions, name="predictions")
    rows = w[pred]
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    return order, np.count_nonzero(rows, axis=1) >= k


def sid_per_image(maps: Any, head_weight: Any, predictions: Any, *, k: int = 5) -> np.ndarray:
    """SID@k of every image; NaN for images whose predicted class has fewer than k nonzero weights.

    loc_k(n) = (1/k) Σ_p max_{j ∈ T_k(n)} P_nj(p), with T_k(n) the top-k features of row W_ĉ(n) and P from
    `spatial_softmax`.

    Args:
        maps: feature maps, shape (N, F, h, w) (any float dtype; converted in chunks).
        head_weight: shape (C, F), binary sparse or dense.
        predictions: predicted classes, shape (N,).
        k: number of features per image.

    Returns:
        float64 array, shape (N,).
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    w = as_float(head_weight, name="head_weight", ndim=2)
    m = as_maps(maps, n_features=w.shape[1])
    top, eligible = top_k_features(w, predictions, k)
    if top.shape[0] != m.shape[0]:
        raise ValueError(f"{top.shape[0]} predictions for {m.shape[0]} images")
    out = np.full(m.shape[0], np.nan)
    idx = np.flatnonzero(eligible)
    for part in chunks(idx.size, k * m.shape[2] * m.shape[3]):
        rows = idx[part]
        # Gather the k maps first: normalisation is per map, so this equals normalising all F and is F/k cheaper.
        probs = spatial_softmax(m[rows[:, None], top[rows]])
        out[rows] = probs.max(axis=1).sum(axis=(1, 2)) / k
    return out


def sid_at_k(maps: Any, head_weight: Any, predictions: Any, *, k: int = 5) -> float:
    """SID@k: mean of `sid_per_image` over the images whose predicted class has at least k nonzero weights.

    Only such images count, as in the reference (docs/method.md#metrics). The reference's quirk of bounding its
    test loop by the train-set size is not reproduced.

    Args:
        maps: feature maps, shape (N, F, h, w).
        head_weight: shape (C, F), binary sparse or dense.
        predictions: predicted classes, shape (N,).
        k: number of features per image (5 for the reported SID@5).

    Returns:
        SID@k in [1/k, 1], or NaN when no image qualifies.
    """
    per_image = sid_per_image(maps, head_weight, predictions, k=k)
    valid = ~np.isnan(per_image)
    return float(per_image[valid].mean()) if valid.any() else float("nan")
