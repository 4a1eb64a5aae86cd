"""Array plumbing shared by the metric modules: conversion to numpy, shape checks, chunking.

Metrics accept numpy arrays or torch tensors (CPU or CUDA, any float dtype) and never import torch: a tensor is
recognised by its `detach` method. Large inputs such as the dense model's (N, 512, 16, 16) test maps are converted
chunk by chunk, so no full float64 copy is ever made.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# Largest number of float64 map elements materialised at once (32 MiB); keeps peak memory flat in N.
CHUNK_ELEMENTS = 1 << 22


class MetricUndefined(ValueError):
    """A metric has no value on the data at hand (e.g. classes that share no attribute), not a bug: `compute_all`
    reports it as null with this message as its reason, and the run goes on."""


def to_numpy(x: Any) -> np.ndarray:
    """Returns `x` as a numpy array without changing its dtype where numpy has it (no copy for CPU arrays).

    Args:
        x: a numpy array, array-like, or torch tensor (detached and moved to CPU here; bfloat16 becomes float32
            because numpy has no bfloat16).
    """
    if hasattr(x, "detach"):
        x = x.detach()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def as_float(x: Any, *, name: str, ndim: int) -> np.ndarray:
    """Converts to a float64 array and checks the number of dimensions (for small inputs only)."""
    arr = np.asarray(to_numpy(x), dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return arr


def as_labels(x: Any, *, name: str = "labels", n: int | None = None) -> np.ndarray:
    """Converts to a 1-D int64 array and, when `n` is given, checks its length."""
    arr = to_numpy(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {n}")
    return arr.astype(np.int64)


def as_maps(x: Any, *, n_features: int | None = None) -> np.ndarray:
    """Returns feature maps as a 4-D numpy array (dtype unchanged, so float16 caches stay small).

    Args:
        x: maps, shape (N, F, h, w).
        n_features: if given, F must equal it (the head's feature count).
    """
    arr = to_numpy(x)
    if arr.ndim != 4:
        raise ValueError(f"maps must have shape (N, F, h, w), got {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"maps have {arr.shape[1]} feature channels but the head weight has {n_features} columns")
    return arr


def predictions_from_logits(logits: Any) -> np.ndarray:
    """Predicted class per sample, argmax over classes (first index on ties, like torch.argmax).

    Args:
        logits: shape (N, C).

    Returns:
        int64 array, shape (N,).
    """
    arr = to_numpy(logits)
    if arr.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {arr.shape}")
    return np.argmax(arr, axis=1).astype(np.int64)


def relevant_features(head_weight: Any) -> np.ndarray:
    """Boolean mask of the head's feature columns with at least one nonzero weight.

    The reference evaluates train-set metrics only on these "rel_features" (docs/method.md#metrics): all F for a dense
    head, the selected ones for a QPM head.

    Args:
        head_weight: shape (C, F).

    Returns:
        bool array, shape (F,).
    """
    w = as_float(head_weight, name="head_weight", ndim=2)
    return np.any(w != 0, axis=0)


def chunks(n: int, per_item: int) -> Iterator[slice]:
    """Consecutive slices over `n` items so that each chunk holds at most CHUNK_ELEMENTS elements."""
    size = max(1, CHUNK_ELEMENTS // max(1, per_item))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
