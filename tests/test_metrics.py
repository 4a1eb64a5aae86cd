"""Tests of toolkit.metrics on small hand-made inputs whose values are known in closed form."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from toolkit.metrics import (
    MetricUndefined,
    _common,
    accuracy,
    class_independence,
    class_shares,
    compute_all,
    contrastiveness,
    correlation,
    dilate_masks,
    feature_part,
    feature_peak_overlap,
    fit_gmm_1d,
    gaussian_overlap,
    gradcam_maps,
    gradcam_mass_overlap,
    gradcam_peak_overlap,
    per_class_accuracy,
    plausibility,
    segmentation_overlaps,
    sid_at_k,
    sid_per_image,
    spatial_softmax,
    structural_grounding,
    top_k_features,
)


def _spikes(positions: list[tuple[int, int]], size: int = 4, height: float = 5.0) -> np.ndarray:
    """One map per position, zero except `height` at that position: shape (len(positions), size, size)."""
    maps = np.zeros((len(positions), size, size))
    for j, (r, c) in enumerate(positions):
        maps[j, r, c] = height
    return maps


# ---------------------------------------------------------------- accuracy


def test_accuracy_and_per_class_accuracy_exact() -> None:
    logits = np.array([[2.0, 1, 0], [0, 3, 1], [1, 0, 0], [0, 0, 5], [0, 2, 1]])
    labels = np.array([0, 1, 1, 2, 0])  # predictions 0, 1, 0, 2, 1 -> 3 of 5 correct
    assert accuracy(logits, labels) == pytest.approx(0.6)
    per_class = per_class_accuracy(logits, labels)
    np.testing.assert_allclose(per_class, [0.5, 0.5, 1.0])
    with_empty = per_class_accuracy(logits, labels, n_classes=4)
    assert math.isnan(with_empty[3])


def test_accuracy_accepts_torch_tensors() -> None:
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=torch.bfloat16, requires_grad=True)
    assert accuracy(logits, torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- SID@k


def test_sid_is_one_for_disjoint_peaks_and_one_over_k_for_identical_maps() -> None:
    k = 3
    w = np.ones((1, k))
    disjoint = _spikes([(0, 0), (1, 2), (3, 3)])[None]  # (1, 3, 4, 4)
    # mean|M| = 5/16, so the spike becomes 16 after normalisation: softmax mass e^16/(e^16+15) ≈ 1 - 1.7e-6
    assert sid_at_k(disjoint, w, [0], k=k) == pytest.approx(1.0, abs=1e-5)
    identical = np.repeat(_spikes([(2, 1)]), k, axis=0)[None]
    assert sid_at_k(identical, w, [0], k=k) == pytest.approx(1 / k, abs=1e-12)


def test_sid_matches_the_formula_on_a_two_position_grid() -> None:
    # Maps on a 1x2 grid: mean-abs normalisation gives [2, 0] and [0, 2]; softmax -> [s, 1-s] with s = e^2/(e^2+1).
    maps = np.array([[[[1.0, 0.0]], [[0.0, 3.0]]]])
    s = math.e**2 / (math.e**2 + 1)
    assert sid_at_k(maps, np.ones((1, 2)), [0], k=2) == pytest.approx((s + s) / 2)
    np.testing.assert_allclose(spatial_softmax(maps)[0, :, 0], [[s, 1 - s], [1 - s, s]])


def test_sid_uses_the_predicted_rows_top_k_and_skips_sparse_rows() -> None:
    # Class 0 uses features 0, 1 (disjoint peaks); class 1 uses only feature 2 -> its images are not counted.
    maps = np.stack([_spikes([(0, 0), (3, 3), (0, 0)])] * 2)
    w = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    per_image = sid_per_image(maps, w, [0, 1], k=2)
    assert per_image[0] == pytest.approx(1.0, abs=1e-5) and math.isnan(per_image[1])
    assert math.isnan(sid_at_k(maps, w, [1, 1], k=2))  # no image qualifies


def test_top_k_ranks_signed_weights_not_magnitudes() -> None:
    w = np.array([[-9.0, 1.0, 3.0, 2.0]])
    top, eligible = top_k_features(w, [0], 2)
    assert top[0].tolist() == [2, 3] and eligible[0]


def test_sid_chunking_matches_a_naive_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(7, 6, 3, 3)).astype(np.float16)
    w = rng.normal(size=(4, 6))
    pred = rng.integers(0, 4, 7)
    expected = []
    for n in range(7):
        top = np.argsort(-w[pred[n]])[:3]
        m = maps[n, top].astype(np.float64).reshape(3, -1)
        m = m / np.maximum(np.abs(m).mean(axis=1, keepdims=True), 1e-5)
        p = np.exp(m) / np.exp(m).sum(axis=1, keepdims=True)
        expected.append(p.max(axis=0).sum() / 3)
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 30)  # forces chunks of one or two images
    assert sid_at_k(maps, w, pred, k=3) == pytest.approx(np.mean(expected), rel=1e-12)


# ---------------------------------------------------------------- class independence, correlation


def test_class_independence_known_values() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    owned = np.eye(3)[labels] * 4.0  # feature c is nonzero only for class c
    assert class_independence(owned, labels) == pytest.approx(0.0)
    shared = np.ones((6, 2)) + np.array([[0, 0], [1, 1]] * 3)  # same values in every class -> shares 1/3
    assert class_independence(shared, labels) == pytest.approx(1 - 1 / 3)
    # One feature with shifted mass (0, 1 | 2, 3 | 0, 0) -> shares (1/6, 5/6, 0) -> CI = 1/6.
    f = np.array([[0.0], [1], [2], [3], [0], [0]])
    np.testing.assert_allclose(class_shares(f, labels)[:, 0], [1 / 6, 5 / 6, 0])
    assert class_independence(f, labels) == pytest.approx(1 / 6)


def test_class_independence_ignores_constant_features() -> None:
    labels = np.array([0, 1])
    f = np.array([[1.0, 7.0], [0.0, 7.0]])  # feature 1 is dead
    assert class_independence(f, labels) == pytest.approx(0.0)
    assert math.isnan(class_independence(np.full((2, 2), 3.0), labels))


def test_correlation_known_values() -> None:
    orthogonal = np.array([[1.0, 0, 0], [0, 2, 0], [0, 0, 3], [0, 0, 0]])
    assert correlation(orthogonal) == pytest.approx(0.0)
    duplicated = np.array([[1.0, 2.0], [3.0, 6.0]])
    assert correlation(duplicated) == pytest.approx(1.0)
    opposite = np.array([[1.0, -1.0], [2.0, -2.0]])  # cosine -1; the zeroed diagonal wins the max (spec)
    assert correlation(opposite) == pytest.approx(0.0)
    # cos(f0, f1) = 1/sqrt(2), f2 orthogonal to both: maxima (1/√2, 1/√2, 0) -> mean √2/3.
    f = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert correlation(f) == pytest.approx(math.sqrt(2) / 3)


# ---------------------------------------------------------------- contrastiveness


def test_gaussian_overlap_matches_closed_form() -> None:
    ovl = gaussian_overlap(np.array([[0.0, 2.0], [1.0, 1.0]]), np.array([[1.0, 1.0], [0.5, 0.5]]))
    assert ovl[0] == pytest.approx(2 * NormalDist().cdf(-1.0))  # equal sigmas: 2Φ(−|Δ|/2σ)
    assert ovl[1] == pytest.approx(1.0)


def test_em_recovers_a_separated_mixture() -> None:
    rng = np.random.default_rng(1)
    low, high = rng.normal(-2, 0.5, 300), rng.normal(4, 1.0, 100)
    weights, means, variances = fit_gmm_1d(np.concatenate([low, high])[:, None])
    order = np.argsort(means[0])
    # The modes are ~7 sd apart, so the fit must equal each mode's sample moments.
    np.testing.assert_allclose(weights[0, order], [0.75, 0.25], atol=1e-4)
    np.testing.assert_allclose(means[0, order], [low.mean(), high.mean()], atol=1e-3)
    np.testing.assert_allclose(variances[0, order], [low.var(), high.var()], atol=1e-3)


def test_contrastiveness_bimodal_high_unimodal_low_constant_zero() -> None:
    rng = np.random.default_rng(2)
    n = 400
    bimodal = np.concatenate([rng.normal(0, 0.1, n // 2), rng.normal(3, 0.1, n // 2)])
    binary = (np.arange(n) % 7 == 0).astype(float)  # two point masses
    unimodal = rng.normal(0, 1, n)
    assert contrastiveness(bimodal[:, None]) > 0.99
    assert contrastiveness(binary[:, None]) > 0.99
    low = contrastiveness(unimodal[:, None])
    assert low < 0.75
    assert contrastiveness(np.full((n, 1), 2.5)) == pytest.approx(0.0, abs=1e-9)
    # Columns are fitted independently: fitting them together changes nothing.
    both = contrastiveness(np.stack([bimodal, unimodal], axis=1))
    assert both == pytest.approx((contrastiveness(bimodal[:, None]) + low) / 2, rel=1e-12)


def _mean_log_likelihood(x: np.ndarray, params: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    weights, means, variances = params
    pdf = np.exp(-0.5 * (x[:, :, None] - means) ** 2 / variances) / np.sqrt(2 * np.pi * variances)
    return np.log((weights * pdf).sum(axis=2)).mean(axis=0)


def test_contrastiveness_is_reproducible_and_restarts_never_lower_the_likelihood() -> None:
    x = np.random.default_rng(3).gamma(2.0, size=(200, 5))
    a = contrastiveness(x, seed=7, n_init=3)
    assert a == contrastiveness(x, seed=7, n_init=3)
    single = _mean_log_likelihood(x, fit_gmm_1d(x))
    restarted = _mean_log_likelihood(x, fit_gmm_1d(x, seed=7, n_init=3))
    assert np.all(restarted >= single - 1e-12)


# ---------------------------------------------------------------- plausibility


def test_dilation_adds_a_one_patch_border_per_image() -> None:
    masks = np.zeros((2, 5, 5))
    masks[0, 2, 2] = 1
    masks[1, 0, 0] = 0.3  # > 0 counts as object
    dil = dilate_masks(masks)
    assert dil[0].sum() == 9 and dil[0, 1:4, 1:4].all()
    assert dil[1].sum() == 4 and dil[1, :2, :2].all()


def test_gradcam_is_weighted_sum_shifted_to_zero_minimum() -> None:
    maps = np.array([[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [0.0, 0.0]]]])
    w = np.array([[1.0, 0.5], [0.0, 1.0]])
    cam = gradcam_maps(maps, w, [0])
    np.testing.assert_allclose(cam[0], np.array([[3.0, 2.0], [3.0, 4.0]]) - 2.0)


def test_plausibility_prefers_maps_peaking_inside_the_mask() -> None:
    masks = np.zeros((1, 6, 6))
    masks[0, 1:3, 1:3] = 1
    w = np.ones((1, 2))
    inside = _spikes([(1, 1), (2, 2)], size=6)[None]
    outside = _spikes([(5, 5), (5, 0)], size=6)[None]
    assert plausibility(inside, w, [0], masks) == pytest.approx(1.0)
    assert plausibility(outside, w, [0], masks) == pytest.approx(0.0)
    for fn in (gradcam_mass_overlap, gradcam_peak_overlap, feature_peak_overlap):
        assert fn(inside, w, [0], masks) > fn(outside, w, [0], masks)


def test_overlap_variants_hand_values() -> None:
    # 1x4 grid, mask on position 1; dilation also covers positions 0 and 2.
    masks = np.array([[[0.0, 1.0, 0.0, 0.0]]])
    maps = np.array([[[[0.0, 1.0, 2.0, 1.0]], [[4.0, 0.0, 0.0, 0.0]], [[9.0, 9.0, 9.0, 9.0]]]])
    w = np.array([[1.0, 1.0, 0.0]])  # feature 2 is not used by class 0
    # g = [4, 1, 2, 1] -> shift by 1 -> [3, 0, 1, 0], total 4.
    expected = {
        "plausibility_gradcam": 0.0,
        "plausibility_gradcam_dilated": 4 / 4,
        "plausibility_gradcam_max": 0.0,
        "plausibility_gradcam_max_dilated": 3 / 3,
        "plausibility_max": (1 / 2 + 0 / 4) / 2,
        "plausibility_max_dilated": (2 / 2 + 4 / 4) / 2,
    }
    assert segmentation_overlaps(maps, w, [0], masks) == pytest.approx(expected)
    assert feature_peak_overlap(maps, w, [0], masks, dilate=True) == pytest.approx(1.0)
    assert gradcam_peak_overlap(maps, w, [0], masks) == pytest.approx(0.0)


def test_flat_gradcam_adds_zero_but_counts() -> None:
    masks = np.ones((2, 2, 2))
    maps = np.stack([np.ones((1, 2, 2)), _spikes([(0, 0)], size=2)])  # image 0: flat cam, denominator 0
    assert gradcam_mass_overlap(maps, np.ones((1, 1)), [0, 0], masks) == pytest.approx(0.5)


def test_mask_grid_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="patch grid"):
        plausibility(np.zeros((1, 2, 4, 4)), np.ones((1, 2)), [0], np.ones((1, 8, 8)))


# ---------------------------------------------------------------- structural grounding


def test_structural_grounding_known_values() -> None:
    attributes = np.array([[1.0, 0.0, 1.0], [1.0, 0.1, 1.0], [0.0, 1.0, 0.0]])
    assert structural_grounding(attributes, class_attributes=attributes, top=2) == pytest.approx(1.0)
    gt = np.array([[1.0, 0.8, 0.1], [0.8, 1.0, 0.2], [0.1, 0.2, 1.0]])
    w = np.zeros((3, 10))  # 5-hot rows: classes 0 and 1 share 2 features, class 2 shares none
    w[0, [0, 1, 2, 3, 4]] = 1
    w[1, [0, 1, 5, 6, 7]] = 1
    w[2, [8, 9]] = 1
    assert structural_grounding(w, gt_similarity=gt, top=2) == pytest.approx((0.4 + 0.4) / (0.8 + 0.8))


# ---------------------------------------------------------------- compute_all


def _toy_inputs(binary_head: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    n, c, f = 12, 3, 6
    labels = np.arange(n) % c
    maps = rng.normal(size=(n, f, 4, 4)).astype(np.float32)
    if binary_head:
        w = np.zeros((c, f))
        for cls in range(c):
            w[cls, [cls, cls + 1, cls + 2]] = 1
    else:
        w = rng.normal(size=(c, f))
    logits = maps.mean(axis=(2, 3)) @ w.T
    return {"logits": logits, "labels": labels, "maps": maps, "features": maps.mean(axis=(2, 3)),
            "head_weight": w}


@pytest.mark.parametrize("binary_head", [False, True])
def test_compute_all_keys_json_and_determinism(binary_head: bool) -> None:
    inputs = _toy_inputs(binary_head)
    without_masks = compute_all(**inputs, k=3)
    assert {"accuracy", "per_class_accuracy", "sid_at_3", "class_independence", "contrastiveness",
            "correlation"} == set(without_masks)
    masks = (np.random.default_rng(5).random((12, 4, 4)) > 0.5).astype(np.float32)
    first = compute_all(**inputs, masks=masks, k=3, seed=0)
    assert first == compute_all(**inputs, masks=masks, k=3, seed=0)
    assert first["plausibility"] == first["plausibility_gradcam_dilated"]
    assert sum(key.startswith("plausibility_") for key in first) == 6
    assert json.loads(json.dumps(first)) == first
    assert first["accuracy"] == accuracy(inputs["logits"], inputs["labels"])
    assert first["sid_at_3"] == sid_at_k(inputs["maps"], inputs["head_weight"], inputs["logits"].argmax(1), k=3)


def test_compute_all_restricts_feature_metrics_to_used_columns_and_checks_labels() -> None:
    inputs = _toy_inputs(True)
    inputs["head_weight"][:, 5] = 0  # feature 5 is now unused
    inputs["features"][:, 5] = inputs["features"][:, 0]  # a duplicate that must not count in correlation
    out = compute_all(**inputs, k=3)
    assert out["correlation"] == pytest.approx(correlation(inputs["features"][:, :5]))
    assert "sid_at_5" not in compute_all(**inputs)  # rows have 3 ones: SID@5 is undefined, so left out
    train = np.random.default_rng(6).normal(size=(20, 6))
    with pytest.raises(ValueError, match="feature_labels"):
        compute_all(**{**inputs, "features": train}, k=3)
    out = compute_all(**{**inputs, "features": train}, feature_labels=np.arange(20) % 3, k=3)
    assert out["class_independence"] == pytest.approx(class_independence(train[:, :5], np.arange(20) % 3))


def test_a_metric_the_data_cannot_define_is_left_out_with_its_reason_a_bug_still_raises() -> None:
    inputs = _toy_inputs(True)
    disjoint = np.kron(np.eye(3), np.ones((1, 4)))  # (3, 12): no two classes share an attribute
    out = compute_all(**inputs, k=3, class_attributes=disjoint)
    assert "structural_grounding" not in out and "sid_at_3" in out
    assert set(out["undefined"]) == {"structural_grounding"}
    assert "sum to ≤ 0" in out["undefined"]["structural_grounding"]
    with pytest.raises(MetricUndefined):
        structural_grounding(inputs["head_weight"], class_attributes=disjoint)
    with pytest.raises(ValueError, match="covers 4 classes") as e:  # 4 attribute rows for 3 classes: not data
        compute_all(**inputs, k=3, class_attributes=np.ones((4, 12)))
    assert not isinstance(e.value, MetricUndefined)


def test_em_loop_is_scikit_learns() -> None:
    """sklearn's `GaussianMixture.fit` runs E then M per iteration and stops after the iteration whose lower bound
    moved by < tol, so its parameters are one M-step past the last likelihood check. With tol = inf it therefore
    does exactly two M-steps (the first change, from -inf, is infinite), never one."""
    x = np.random.default_rng(0).normal(3, 1, 500)[:, None]
    two = fit_gmm_1d(x, max_iter=2, tol=0.0)
    for a, b in zip(fit_gmm_1d(x, tol=np.inf), two):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(fit_gmm_1d(x, max_iter=1, tol=0.0)[1], two[1])
    # Unimodal N(3, 1), 500 samples: scikit-learn 1.9.1 GaussianMixture(2, weights_init, means_init, precisions_init
    # set to this module's 2-means start) gives means (2.45015688, 3.64408018), variances (0.72105602, 0.61933013)
    # after 8 iterations, contrastiveness 0.5350460; with its default k-means start and random_state 0-4 the same.
    _, means, variances = fit_gmm_1d(x)
    np.testing.assert_allclose(means[0], [2.45015688, 3.64408018], atol=1e-7)
    np.testing.assert_allclose(variances[0], [0.72105602, 0.61933013], atol=1e-7)
    assert contrastiveness(x) == pytest.approx(0.5350460, abs=1e-7)


def test_correlation_reads_raw_features_not_standardised() -> None:
    """The reference scores the QPM model's raw selected features; standardising first changes the uncentred cosine:
    x1 = (1, 2, 3), x2 = (3, 2, 1) have cosine 10/14 = 0.714, their z-scores cosine -1 (-> 0 after the diagonal)."""
    raw = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    assert correlation(raw) == pytest.approx(10 / 14)
    z = (raw - raw.mean(0)) / raw.std(0)
    assert correlation(z) == pytest.approx(0.0, abs=1e-12)
    # Class independence and contrastiveness do not change under the head's per-feature (f - mu) / sigma.
    rng = np.random.default_rng(4)
    f = rng.gamma(2.0, size=(120, 4))
    y = np.repeat(np.arange(3), 40)
    fz = (f - f.mean(0)) / f.std(0)
    assert class_independence(fz, y, n_classes=3) == pytest.approx(class_independence(f, y, n_classes=3))
    assert contrastiveness(fz) == pytest.approx(contrastiveness(f), abs=1e-4)


def test_feature_metrics_of_an_earlier_call_are_reused_not_recomputed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluation scores validation and test against the same train features: the second split reuses the
    first one's feature metrics (contrastiveness's EM over 50k train rows takes minutes), with the same values."""
    from toolkit.metrics import report

    inputs = _toy_inputs(True)
    first = compute_all(**inputs, k=3)
    shared = feature_part(first)
    assert set(shared) == {"class_independence", "contrastiveness", "correlation"}

    def refuse(*_: object, **__: object) -> float:
        raise AssertionError("recomputed a feature metric that was passed in")

    for name in ("class_independence", "contrastiveness", "correlation"):
        monkeypatch.setattr(report, name, refuse)
    other = {**inputs, "logits": inputs["logits"][::-1].copy(), "maps": inputs["maps"][::-1].copy()}
    again = compute_all(**other, k=3, feature_metrics=shared)
    assert {k: again[k] for k in shared} == shared
    # An undefined feature metric stays undefined, with its reason.
    why = {"correlation": "needs two columns"}
    out = compute_all(**other, k=3, feature_metrics={"contrastiveness": 0.5, "undefined": why})
    assert out["contrastiveness"] == 0.5 and "correlation" not in out and out["undefined"] == why
