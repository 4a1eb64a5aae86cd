"""QP inputs: A against a direct Pearson computation, dead features and empty classes, R's post-processing, .npz I/O."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolkit.qp.inputs import correlation_A, load_inputs, save_inputs, similarity_R


def _data(seed: int = 0, n: int = 60, f: int = 7, c: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    feats = np.maximum(rng.normal(size=(n, f)) + 0.8 * np.eye(c, f)[labels] * 2, 0).astype(np.float32)
    return feats, labels


def test_A_is_pearson_with_one_hot_labels_scaled_to_max_one() -> None:
    feats, labels = _data()
    A = correlation_A(feats, labels, 4)
    onehot = np.eye(4)[labels]
    ref = np.array([[np.corrcoef(feats[:, j], onehot[:, c])[0, 1] for c in range(4)] for j in range(feats.shape[1])])
    ref /= np.abs(ref).max()
    assert A.shape == (7, 4)
    np.testing.assert_allclose(A, ref, atol=1e-9)
    assert np.isclose(np.abs(A).max(), 1.0)


def test_dead_feature_and_empty_class_give_zeros_not_nan() -> None:
    feats, labels = _data()
    feats[:, 2] = 3.0  # zero variance
    labels[labels == 3] = 0  # class 3 has no samples
    A = correlation_A(feats, labels, 5)
    assert np.isfinite(A).all()
    assert (A[2] == 0).all()
    assert (A[:, 3] == 0).all() and (A[:, 4] == 0).all()
    assert np.isclose(np.abs(A).max(), 1.0)


@pytest.mark.parametrize("bad", ["shape", "range", "nan", "float_labels"])
def test_A_rejects_bad_inputs(bad: str) -> None:
    feats, labels = _data()
    if bad == "shape":
        labels = labels[:-1]
    elif bad == "range":
        labels[0] = 9
    elif bad == "nan":
        feats[3, 1] = np.nan
    else:
        labels = labels.astype(np.float64)
    with pytest.raises(ValueError):
        correlation_A(feats, labels, 4)


def test_R_is_row_cosine_with_zero_diagonal_and_no_negatives() -> None:
    A = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    R = similarity_R(A)
    assert R.shape == (4, 4)
    np.testing.assert_allclose(R, R.T)
    assert (np.diag(R) == 0).all()
    assert np.isclose(R[0, 1], 1 / np.sqrt(2))
    assert R[0, 2] == 0  # cosine -1 clipped to 0
    assert (R[3] == 0).all()  # a zero row has no similarity, not NaN
    rng = np.random.default_rng(1)
    B = rng.normal(size=(6, 5))
    Rb = similarity_R(B)
    n = np.linalg.norm(B, axis=1)
    ref = np.maximum(B @ B.T / np.outer(n, n), 0)
    np.fill_diagonal(ref, 0)
    np.testing.assert_allclose(Rb, ref, atol=1e-12)


def test_save_and_load_round_trip_with_and_without_R(tmp_path: Path) -> None:
    A = np.arange(6.0).reshape(3, 2) / 5
    R = similarity_R(A)
    save_inputs(tmp_path / "x.npz", A, R)
    A2, R2 = load_inputs(tmp_path / "x.npz")
    np.testing.assert_array_equal(A2, A)
    np.testing.assert_array_equal(R2, R)
    save_inputs(tmp_path / "y.npz", A)
    A3, R3 = load_inputs(tmp_path / "y.npz")
    np.testing.assert_array_equal(A3, A)
    assert R3 is None


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_inputs(tmp_path / "missing.npz")
    np.savez(tmp_path / "noA.npz", B=np.zeros(3))
    with pytest.raises(ValueError, match="no 'A'"):
        load_inputs(tmp_path / "noA.npz")
    (tmp_path / "junk.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_inputs(tmp_path / "junk.npz")
