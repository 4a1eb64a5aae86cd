"""Structural Grounding: does the head make classes similar that are similar in the world (docs/method.md#metrics)?

The class similarity implied by the head (cosine between weight rows) is compared with a ground-truth class
similarity (cosine between CUB's 312-d continuous class-attribute vectors) on the most similar ground-truth
pairs. Reading CUB's `class_attribute_labels_continuous.txt` is the data layer's job; these functions take arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.metrics._common import MetricUndefined, as_float

EPS = 1e-12


def cosine_similarity_rows(x: Any) -> np.ndarray:
    """Cosine between all pairs of rows, with a zero diagonal (zero rows give similarity 0).

    Args:
        x: shape (C, D).

    Returns:
        float64 array, shape (C, C).
    """
    a = as_float(x, name="rows", ndim=2)
    unit = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), EPS)
    sim = unit @ unit.T
    np.fill_diagonal(sim, 0.0)
    return sim


def structural_grounding(head_weight: Any, *, class_attributes: Any = None, gt_similarity: Any = None,
                         top: int = 50) -> float:
    """Structural Grounding = Σ_{(c,c') ∈ T} S_w[c,c'] / Σ_{(c,c') ∈ T} S_gt[c,c'].

    S_w = cos(W_c, W_c'), S_gt = cos(a_c, a_c') (both with zero diagonal), and T holds the `top` largest entries
    of the flattened S_gt; with the reference's 50 that is 25 symmetric pairs (docs/method.md#metrics). For binary
    rows with 5 ones, S_w is |shared features| / 5. Ties in S_gt are broken by the lower flat index.

    Args:
        head_weight: shape (C, F), the used columns (extra all-zero columns do not change the cosines).
        class_attributes: per-class attribute vectors, shape (C, A); used when gt_similarity is None.
        gt_similarity: a precomputed ground-truth similarity, shape (C, C) (its diagonal is ignored).
        top: number of flattened entries of S_gt to compare on.

    Returns:
        The ratio; 1 means the head reproduces the ground-truth similarity of the most similar pairs.

    Raises:
        MetricUndefined: the chosen ground-truth similarities sum to ≤ 0 (no two classes share an attribute).
    """
    s_w = cosine_similarity_rows(head_weight)
    if gt_similarity is not None:
        s_gt = as_float(gt_similarity, name="gt_similarity", ndim=2).copy()
        np.fill_diagonal(s_gt, 0.0)
    elif class_attributes is not None:
        s_gt = cosine_similarity_rows(class_attributes)
    else:
        raise ValueError("pass class_attributes or gt_similarity")
    if s_gt.shape != s_w.shape:
        raise ValueError(f"ground truth covers {s_gt.shape[0]} classes, the head {s_w.shape[0]}")
    flat_gt = s_gt.ravel()
    chosen = np.argsort(-flat_gt, kind="stable")[:top]
    denom = flat_gt[chosen].sum()
    if denom <= 0:
        raise MetricUndefined(f"the chosen ground-truth similarities sum to ≤ 0 ({denom:.3g}): the {top} most similar "
                              "class pairs share no attribute, so there is no similarity for the head to reproduce")
    return float(s_w.ravel()[chosen].sum() / denom)
