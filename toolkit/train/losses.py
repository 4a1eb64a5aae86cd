"""Training losses of DINO-QPM (docs/method.md#losses), as pure functions of the model outputs.

L = CE(logits, y) + L_div + l1_maps_weight * L1-FM + l1_vector_weight * L1-FV, where a term is added only if its
weight is > 1e-6 (as in the reference). Dense phase: beta = 0.5, no L1 terms. Fine-tune: beta = 1, 5 * L1-FM + 1 * L1-FV
over the k selected channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHT_EPS = 1e-5  # omega = |W_c| / (||W_c||_2 + 1e-5)
SCALE_FLOOR = 1e-6  # a = v / max(max_k v_k, 1e-6)
ACTIVE_WEIGHT = 1e-6  # a loss term is computed only when its weight exceeds this


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy, no label smoothing.

    Args:
        logits: shape (B, C).
        labels: class indices, shape (B,).

    Returns:
        Scalar tensor.
    """
    return F.cross_entropy(logits.float(), labels)


def feature_diversity_loss(maps: Tensor, features: Tensor, logits: Tensor, head_weight: Tensor, beta: float) -> Tensor:
    """Feature-diversity loss of Q-SENN / DINO-QPM (docs/method.md#losses).

    For sample b with predicted class c_b = argmax_c logits_bc:

        omega_bj   = |W_{c_b j}| / (||W_{c_b,:}||_2 + 1e-5)
        sigma_bj   = softmax over the h*w positions of M_bj                  (spatial softmax per channel)
        a_bj       = v_bj / max(max_k v_bk, 1e-6)                            (relative feature magnitude)
        L_div      = -(beta / B) * sum_b sum_p max_j ( omega_bj * a_bj * sigma_bj(p) )

    Summing the cross-channel maximum over positions rewards the class-relevant features for peaking at different
    places: co-located peaks share one max, disjoint peaks each count.

    Gradient flows through `maps`, `features` and `head_weight` (the reference does not detach W, so in the dense
    phase the head is trained by this term too; a binary sparse W is a buffer and gets none). It never flows through
    the argmax, so `logits` receive no gradient from this loss.

    Reference quirks kept on purpose:
    * c_b is the *predicted* class, not the label: the loss shapes the explanation of the class the model actually
      outputs (the one a user is shown), it needs no labels, and it is what the published numbers were trained with.
    * a_bj divides by max_k v_bk, not max_k |v_bk|; with the default ReLU adapter v >= 0 so this is a true [0, 1]
      scale, but with a signed activation (gelu) a negative max would hit the 1e-6 floor and blow a_bj up.
    * The reference feeds the pooled vector *after* the head's dropout; the model here passes the pre-dropout pooled
      vector (exactly the mean of the maps, docs/method.md#losses). They coincide when dropout is 0 (fine-tune).

    Args:
        maps: feature maps M, shape (B, F, h, w).
        features: pooled features v, shape (B, F).
        logits: shape (B, C); only their argmax is used.
        head_weight: class-feature matrix W, shape (C, F).
        beta: the loss weight (0.5 dense, 1.0 fine-tune).

    Returns:
        Scalar tensor (<= 0), computed in float32.
    """
    if maps.dim() != 4 or features.shape != maps.shape[:2] or head_weight.shape[1] != maps.shape[1]:
        raise ValueError(f"shape mismatch: maps {tuple(maps.shape)} (B, F, h, w), features {tuple(features.shape)} "
                         f"(B, F), head_weight {tuple(head_weight.shape)} (C, F)")
    n = maps.shape[0]
    predicted = logits.detach().argmax(dim=1)  # (B,)
    w = head_weight.float()[predicted]  # (B, F)
    omega = w.abs() / (w.norm(dim=1, keepdim=True) + WEIGHT_EPS)  # (B, F)
    v = features.float()
    a = v / v.max(dim=1, keepdim=True).values.clamp_min(SCALE_FLOOR)  # (B, F)
    sigma = torch.softmax(maps.float().flatten(2), dim=-1)  # (B, F, h*w)
    weighted = (omega * a).unsqueeze(-1) * sigma  # (B, F, h*w)
    # amax, as the reference: where channels tie (e.g. all-zero maps) the gradient is split evenly among them
    # (max would send it to one); the loss value is the same.
    return -(beta / n) * weighted.amax(dim=1).sum()


def l1_maps(maps: Tensor) -> Tensor:
    """L1-FM: mean over (b, j, h, w) of |M_bj(h, w)|. Args: maps (B, F, h, w). Returns: scalar."""
    return maps.float().abs().mean()


def l1_vector(features: Tensor) -> Tensor:
    """L1-FV: mean over (b, j) of |v_bj|. Args: features (B, F). Returns: scalar."""
    return features.float().abs().mean()


def total_loss(
    *,
    logits: Tensor,
    labels: Tensor,
    maps: Tensor,
    features: Tensor,
    head_weight: Tensor,
    diversity_weight: float,
    l1_maps_weight: float,
    l1_vector_weight: float,
) -> tuple[Tensor, dict[str, float]]:
    """CE plus each regulariser whose weight is > 1e-6.

    Args:
        logits: shape (B, C).
        labels: shape (B,).
        maps: shape (B, F', h, w).
        features: shape (B, F').
        head_weight: shape (C, F').
        diversity_weight: beta of `feature_diversity_loss` (already inside that term, not multiplied again).
        l1_maps_weight: weight of `l1_maps`.
        l1_vector_weight: weight of `l1_vector`.

    Returns:
        The loss to backpropagate, and for logging the float values of "loss", "ce" and each active weighted term
        ("diversity", "l1_maps", "l1_vector"; the weighted value, i.e. what was added to the loss).
    """
    parts: dict[str, Tensor] = {"ce": cross_entropy(logits, labels)}
    if diversity_weight > ACTIVE_WEIGHT:
        parts["diversity"] = feature_diversity_loss(maps, features, logits, head_weight, diversity_weight)
    if l1_maps_weight > ACTIVE_WEIGHT:
        parts["l1_maps"] = l1_maps_weight * l1_maps(maps)
    if l1_vector_weight > ACTIVE_WEIGHT:
        parts["l1_vector"] = l1_vector_weight * l1_vector(features)
    loss = torch.stack(list(parts.values())).sum()
    # One device sync for all the logged numbers instead of one .item() per term.
    values = torch.stack([loss.detach(), *(p.detach() for p in parts.values())]).tolist()
    return loss, dict(zip(["loss", *parts], values))


__all__ = ["cross_entropy", "feature_diversity_loss", "l1_maps", "l1_vector", "total_loss"]
