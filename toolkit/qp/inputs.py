"""Inputs of the QPM selection problem: A (feature-class correlation) and R (feature-feature similarity).

Both follow QPM and the DINO-QPM reference code (docs/method.md#qp) as pure array maths on the pooled train
features:

    A[f, c] = cov(x_f, y_c) / (std(x_f) * std(y_c))   (Pearson with the one-hot label y_c, population std)
    A      <- A / max|A|
    R[i, j] = cos(A[i, :], A[j, :])                   (class-correlation profiles, not activations)
    R      <- R with its diagonal set to 0, and its negatives too unless keep_negative (the reference rule)

Guard the reference lacks: a dead feature (zero variance) or an empty class gives a 0 row / column
instead of NaN.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

_EPS_STD = 1e-10  # std products below this count as zero variance (the reference's max(std*std, 1e-10) guard)
_EPS_COS = 1e-8  # cosine denominator guard, as torch.nn.functional.cosine_similarity
_CHUNK = 8192  # rows per chunk when accumulating moments, so (N, F) never needs a float64 copy


def correlation_A(features: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Pearson correlation of every feature with every one-hot class indicator, scaled to max|A| = 1.

    Args:
        features: (N, F) pooled activations of the N training images (any float dtype, torch CPU tensors work).
        labels: (N,) integer class indices in [0, n_classes).
        n_classes: C, the number of classes (columns of A); classes without samples give 0 columns.

    Returns:
        (F, C) float64 A with max|A| = 1 (all zeros if every feature is dead).

    Raises:
        ValueError: shapes do not match, labels are out of range, or features are not finite.
    """
    x = np.asarray(features)
    y = np.asarray(labels)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, F), got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must be (N,) = ({x.shape[0]},) to match features, got shape {y.shape}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if x.shape[0] == 0:
        raise ValueError("features are empty (N = 0): A needs at least one training image")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{y.min()}, {y.max()}]")
    n, n_feat = x.shape
    # First and second moments plus per-class sums, accumulated in float64 chunk by chunk.
    total = np.zeros(n_feat)
    class_sum = np.zeros((n_classes, n_feat))
    for start in range(0, n, _CHUNK):
        xb = np.asarray(x[start:start + _CHUNK], dtype=np.float64)
        if not np.isfinite(xb).all():
            raise ValueError("features contain NaN or inf; A needs finite activations")
        total += xb.sum(0)
        np.add.at(class_sum, y[start:start + _CHUNK], xb)
    mean = total / n
    sq = np.zeros(n_feat)
    for start in range(0, n, _CHUNK):
        d = np.asarray(x[start:start + _CHUNK], dtype=np.float64) - mean
        sq += (d * d).sum(0)
    std_f = np.sqrt(sq / n)
    p = np.bincount(y, minlength=n_classes) / n
    std_y = np.sqrt(p * (1.0 - p))
    # cov(x_f, y_c) = (1/N) sum_{i in c} x_if - mean_f * p_c
    cov = class_sum.T / n - mean[:, None] * p[None, :]
    denom = std_f[:, None] * std_y[None, :]
    A = np.where(denom > _EPS_STD, cov / np.maximum(denom, _EPS_STD), 0.0)
    peak = np.abs(A).max()
    return A / peak if peak > 0 else A


def similarity_R(A: np.ndarray, *, keep_negative: bool = False) -> np.ndarray:
    """Cosine similarity between the rows of A, with the diagonal and the negatives set to 0.

    Args:
        A: (F, C) feature-class correlation.
        keep_negative: keep negative cosines (DINO-QPM's R for the reference redundancy rule).

    Returns:
        (F, F) symmetric float64 R with entries in [0, 1] and a zero diagonal.
    """
    a = np.asarray(A, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"A must be (F, C), got shape {a.shape}")
    norms = np.linalg.norm(a, axis=1)
    R = (a @ a.T) / np.maximum(np.outer(norms, norms), _EPS_COS)
    np.fill_diagonal(R, 0.0)
    if keep_negative:
        return np.clip(R, -1.0, 1.0)
    np.maximum(R, 0.0, out=R)
    # The reference also divides by max|R|; with cosines that is 1 (or 0 rows), so R is used as is.
    return np.minimum(R, 1.0)


def save_inputs(path: str | Path, A: np.ndarray, R: np.ndarray | None = None) -> None:
    """Write A (and R when given) to a .npz file, the input format of `python -m toolkit.qp --inputs`."""
    arrays = {"A": np.asarray(A, dtype=np.float64)}
    if R is not None:
        arrays["R"] = np.asarray(R, dtype=np.float64)
    with open(path, "wb") as fh:  # a file handle keeps numpy from appending a second .npz suffix
        np.savez(fh, **arrays)


def load_inputs(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read (A, R) from a .npz written by `save_inputs`; R is None when the file has none.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a .npz archive or holds no array named `A`.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"QP inputs file {p} not found; write one with qp_inputs.save_inputs(path, A, R)")
    try:
        data = np.load(p, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{p} is not a readable .npz archive ({exc}); write it with np.savez(path, A=A, R=R)") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{p} holds a single array, not a .npz archive; write it with np.savez(path, A=A, R=R)")
    with data:
        names = list(data.files)
        if "A" not in names:
            raise ValueError(f"{p} holds arrays {names} but no 'A'; save the (F, C) correlation matrix under the "
                             f"name A (np.savez(path, A=A, R=R))")
        A = np.asarray(data["A"])
        R = np.asarray(data["R"]) if "R" in names else None
    return A, R
