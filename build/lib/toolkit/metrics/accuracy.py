"""Top-1 accuracy and per-class accuracy from logits (docs/method.md#metrics, "Accuracy")."""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.metrics._common import as_labels, predictions_from_logits


def accuracy(logits: Any, labels: Any) -> float:
    """Top-1 accuracy as a fraction.

    acc = (1/N) Σ_n [argmax_c logits_nc = y_n]

    Args:
        logits: shape (N, C).
        labels: true classes, shape (N,).

    Returns:
        The fraction of correct predictions, in [0, 1].
    """
    pred = predictions_from_logits(logits)
    y = as_labels(labels, n=pred.shape[0])
    if y.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(pred == y))


def per_class_accuracy(logits: Any, labels: Any, *, n_classes: int | None = None) -> np.ndarray:
    """Top-1 accuracy of each true class (recall per class).

    acc_c = |{n : y_n = c, argmax logits_n = c}| / |{n : y_n = c}|

    Args:
        logits: shape (N, C).
        labels: true classes, shape (N,).
        n_classes: number of classes; defaults to C.

    Returns:
        float64 array, shape (n_classes,); NaN for classes with no sample.
    """
    pred = predictions_from_logits(logits)
    y = as_labels(labels, n=pred.shape[0])
    n_classes = int(np.shape(logits)[1] if n_classes is None else n_classes)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes})")
    total = np.bincount(y, minlength=n_classes).astype(np.float64)
    correct = np.bincount(y[pred == y], minlength=n_classes).astype(np.float64)
    return np.where(total > 0, correct / np.maximum(total, 1), np.nan)

