"""The splits a run works with, and the validation split carved from train.

A dataset has two stored splits, train and test (`SPLITS`); the token cache holds one store per stored split. The
validation split is not stored: it is a seeded, class-stratified share (`data.val_fraction`) of the train split's
rows, so its tokens are rows of the train store. Every stage trains on the other rows (the fit rows); every decision
inside a run or a sweep (a learning rate, a sweep's winner) reads validation; test is only reported
(docs/method.md#baselines).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

SPLITS: tuple[Literal["train", "test"], ...] = ("train", "test")  # the stored splits: one token store each
EVAL_SPLITS = ("val", "test")  # where every model is scored: validation (for deciding) and test (for reading)
_STREAM = 2  # seed stream of the validation draw (0 and 1 are the train / test subset draws of `load_dataset`)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val) indices: a seeded share `fraction` of every class (at least one sample if the class has two).

    Args:
        labels: (N,) integer labels.
        fraction: share of each class held out, in [0, 1); 0 holds out nothing.
        seed: seed of the draw; the same labels, fraction and seed always give the same indices.

    Returns:
        Two sorted int64 index arrays that partition range(N).
    """
    rng = np.random.default_rng([seed, _STREAM])
    fit, val = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = 0
        if fraction > 0:
            n_val = min(max(int(round(fraction * len(idx))), 1 if len(idx) > 1 else 0), len(idx) - 1)
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


@dataclass(frozen=True)
class Holdout:
    """The validation split of a run: which train rows are held out, drawn how.

    Attributes:
        fraction: `data.val_fraction` (0 = nothing held out).
        seed: `data.seed`, the seed of the draw.
        fit: (N_fit,) sorted train rows the stages train on.
        val: (N_val,) sorted train rows every decision reads.
    """

    fraction: float
    seed: int
    fit: np.ndarray
    val: np.ndarray

    @property
    def held_out(self) -> bool:
        return len(self.val) > 0

    @property
    def tag(self) -> str:
        """Names the draw inside split keys: fraction, seed and a hash of the held-out rows."""
        rows = hashlib.sha256(np.asarray(self.val, np.int64).tobytes()).hexdigest()[:12]
        return f"val{self.fraction:g}-seed{self.seed}-{rows}"

    def describe(self) -> dict[str, Any]:
        """What the manifest and metrics.json record about it."""
        return {"held_out": self.held_out, "fraction": self.fraction, "seed": self.seed, "n_val": int(len(self.val)),
                "n_fit": int(len(self.fit)),
                "note": "validation = a seeded, class-stratified share of the train split; every stage trains on "
                        "the rest; decisions read validation, test is only reported" if self.held_out else
                        "nothing held out (data.val_fraction=0): every stage trains on the whole train split and "
                        "no validation metrics exist"}


def holdout(labels: np.ndarray, fraction: float, seed: int) -> Holdout:
    """The validation split of a train split with these labels (see `stratified_holdout`)."""
    fit, val = stratified_holdout(np.asarray(labels), fraction, seed)
    return Holdout(fraction=float(fraction), seed=int(seed), fit=fit, val=val)
