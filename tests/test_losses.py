"""Losses: hand-computed diversity loss, its geometry and gradients, L1 terms, and the total."""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.train.losses import cross_entropy, feature_diversity_loss, l1_maps, l1_vector, total_loss


def _softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_diversity_loss_by_hand_single_sample() -> None:
    # B=1, F=2, C=2, maps on a 2x1 grid. Predicted class 0 (logit 1 > 0), W_0 = (1, 2).
    w = [[1.0, 2.0], [0.0, 1.0]]
    m = [[1.0, 0.0], [0.0, 2.0]]  # M_j(p) for j = 0, 1 and positions p = 0, 1
    v = [sum(row) / 2 for row in m]  # pooled features: 0.5, 1.0
    norm = math.sqrt(1.0 + 4.0)
    omega = [abs(x) / (norm + 1e-5) for x in w[0]]
    a = [x / max(max(v), 1e-6) for x in v]
    sig = [_softmax(row) for row in m]
    beta = 0.5
    expected = -beta * sum(max(omega[j] * a[j] * sig[j][p] for j in range(2)) for p in range(2))

    maps = torch.tensor(m).reshape(1, 2, 2, 1)
    got = feature_diversity_loss(maps, torch.tensor([v]), torch.tensor([[1.0, 0.0]]), torch.tensor(w), beta)
    assert got.shape == ()
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_diversity_loss_by_hand_uses_each_samples_predicted_class_and_averages() -> None:
    w = [[1.0, 2.0], [0.0, 1.0]]
    m1 = [[1.0, 0.0], [0.0, 2.0]]
    m2 = [[3.0, 3.0], [1.0, 0.0]]

    def by_hand(m: list[list[float]], c: int) -> float:
        v = [sum(row) / 2 for row in m]
        norm = math.sqrt(sum(x * x for x in w[c]))
        omega = [abs(x) / (norm + 1e-5) for x in w[c]]
        a = [x / max(max(v), 1e-6) for x in v]
        sig = [_softmax(row) for row in m]
        return sum(max(omega[j] * a[j] * sig[j][p] for j in range(2)) for p in range(2))

    beta = 1.0
    expected = -(beta / 2) * (by_hand(m1, 0) + by_hand(m2, 1))
    maps = torch.tensor([m1, m2]).reshape(2, 2, 2, 1)
    features = maps.mean(dim=(2, 3))
    logits = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # sample 2 predicts class 1: only feature 1 has weight
    got = feature_diversity_loss(maps, features, logits, torch.tensor(w), beta)
    assert math.isclose(got.item(), expected, rel_tol=1e-6)
    assert math.isclose(by_hand(m2, 1), (1 / (1 + 1e-5)) / 6, rel_tol=1e-9)  # sanity of the hand formula


def _peaked(positions: list[tuple[int, int]], size: int = 4, height: float = 5.0) -> torch.Tensor:
    maps = torch.zeros(1, len(positions), size, size)
    for j, (r, c) in enumerate(positions):
        maps[0, j, r, c] = height
    return maps


def test_disjoint_peaks_give_lower_loss_than_colocated() -> None:
    w = torch.ones(1, 2)
    logits = torch.zeros(1, 1)
    disjoint = _peaked([(0, 0), (3, 3)])
    colocated = _peaked([(0, 0), (0, 0)])
    l_dis = feature_diversity_loss(disjoint, disjoint.mean(dim=(2, 3)), logits, w, 0.5)
    l_col = feature_diversity_loss(colocated, colocated.mean(dim=(2, 3)), logits, w, 0.5)
    assert l_dis < l_col < 0


def test_zero_weight_feature_does_not_count() -> None:
    maps = _peaked([(0, 0), (3, 3)])
    feats = maps.mean(dim=(2, 3))
    logits = torch.zeros(1, 1)
    only_first = feature_diversity_loss(maps, feats, logits, torch.tensor([[1.0, 0.0]]), 1.0)
    single = feature_diversity_loss(maps[:, :1], feats[:, :1], logits, torch.tensor([[1.0]]), 1.0)
    torch.testing.assert_close(only_first, single, rtol=1e-6, atol=0)  # both features have a = 1 (equal peaks)
    assert only_first < 0


def test_gradient_flows_to_maps_features_weight_not_logits() -> None:
    torch.manual_seed(0)
    maps = torch.rand(3, 4, 2, 2, requires_grad=True)
    features = torch.rand(3, 4, requires_grad=True)
    logits = torch.randn(3, 5, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    loss = feature_diversity_loss(maps, features, logits, w, 0.5)
    g_maps, g_feat, g_logits, g_w = torch.autograd.grad(loss, [maps, features, logits, w], allow_unused=True)
    assert g_logits is None
    assert g_maps.abs().sum() > 0 and g_feat.abs().sum() > 0 and g_w.abs().sum() > 0


def test_diversity_loss_is_float32_for_low_precision_inputs() -> None:
    maps = torch.rand(2, 3, 2, 2).bfloat16()
    out = feature_diversity_loss(maps, maps.float().mean(dim=(2, 3)).bfloat16(), torch.randn(2, 4),
                                 torch.randn(4, 3), 0.5)
    assert out.dtype == torch.float32


def test_diversity_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        feature_diversity_loss(torch.rand(2, 3, 2, 2), torch.rand(2, 4), torch.randn(2, 4), torch.randn(4, 3), 0.5)


def test_l1_values() -> None:
    maps = torch.tensor([[[[1.0, -2.0]], [[0.0, 3.0]]]])  # (1, 2, 1, 2)
    assert l1_maps(maps).item() == pytest.approx((1 + 2 + 0 + 3) / 4)
    assert l1_vector(torch.tensor([[-1.0, 2.0], [0.5, 0.5]])).item() == pytest.approx(4.0 / 4)


def test_cross_entropy_value() -> None:
    logits = torch.tensor([[2.0, 0.0]])
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    assert cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_total_loss_sums_active_terms_and_reports_parts() -> None:
    torch.manual_seed(0)
    maps = torch.rand(2, 3, 2, 2)
    features = maps.mean(dim=(2, 3))
    logits = torch.randn(2, 4, requires_grad=True)
    labels = torch.tensor([1, 3])
    w = torch.randn(4, 3)
    loss, parts = total_loss(logits=logits, labels=labels, maps=maps, features=features, head_weight=w,
                             diversity_weight=0.5, l1_maps_weight=5.0, l1_vector_weight=1.0)
    ce = cross_entropy(logits, labels).item()
    div = feature_diversity_loss(maps, features, logits, w, 0.5).item()
    assert set(parts) == {"loss", "ce", "diversity", "l1_maps", "l1_vector"}
    assert parts["ce"] == pytest.approx(ce) and parts["diversity"] == pytest.approx(div)
    assert parts["l1_maps"] == pytest.approx(5.0 * maps.abs().mean().item())
    assert parts["l1_vector"] == pytest.approx(features.abs().mean().item())
    assert loss.item() == pytest.approx(ce + div + parts["l1_maps"] + parts["l1_vector"], rel=1e-6)
    assert parts["loss"] == pytest.approx(loss.item())
    loss.backward()
    assert logits.grad is not None  # through CE

    loss0, parts0 = total_loss(logits=logits, labels=labels, maps=maps, features=features, head_weight=w,
                               diversity_weight=0.0, l1_maps_weight=1e-7, l1_vector_weight=0.0)
    assert set(parts0) == {"loss", "ce"}
    assert loss0.item() == pytest.approx(ce)
