"""Heads on the pooled features: the dense head of phase 1, the binary QPM head, and the CLS linear probe."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

STD_FLOOR = 1e-6  # the reference's max(sigma, 1e-6) guard against dead features (docs/method.md#model)


class DenseHead(nn.Module):
    """Dense head of phase 1 (docs/method.md#model): Dropout on the pooled vector, then Linear(F -> C) with bias.

    Parameters: F * C + C.

    Args:
        n_features: F.
        n_classes: C.
        dropout: drop probability on the pooled features (0.2 in the reference's dense phase).
    """

    def __init__(self, *, n_features: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(n_features, n_classes)

    @property
    def weight(self) -> Tensor:
        """The class-feature weights, shape (C, F) (a live Parameter, so the diversity loss trains it too)."""
        return self.linear.weight

    @property
    def n_features(self) -> int:
        return self.linear.in_features

    @property
    def n_classes(self) -> int:
        return self.linear.out_features

    def forward(self, features: Tensor) -> Tensor:
        """Args: features (B, F). Returns: logits (B, C)."""
        return self.linear(self.dropout(features))


class SparseHead(nn.Module):
    """The QPM head (docs/method.md#model): k selected features, standardised, and a binary class-feature matrix.

    logits_c = sum_j W_cj (f_j - mu_j) / max(sigma_j, 1e-6), with no bias. W has the same number m of ones in every
    row (m features per class). Selection, W, mu and sigma are buffers: frozen, but saved in the state_dict, so a
    checkpoint is self-contained (the reference keeps the selection in a separate pickle, §7 item 7).

    Parameters: 0 trainable; buffers k (selection) + C * k (W) + 2 k (mu, sigma).

    Args:
        selection: indices of the selected adapter channels, shape (k,), distinct, in the order of W's columns.
        weight: binary matrix, shape (C, k), with the same number of ones in every row.
        mean: per-feature mean of the dense model's pooled train features, shape (k,).
        std: per-feature population std of the same, shape (k,).
        dropout: drop probability on the selected features before standardisation (0 in DINO-QPM's fine-tune).

    Raises:
        ValueError: a shape disagrees, W is not binary, its rows hold different numbers of ones (or none), or the
            selection has duplicates or negative indices.
    """

    selection: Tensor
    weight: Tensor
    mean: Tensor
    std: Tensor

    def __init__(self, *, selection: Tensor, weight: Tensor, mean: Tensor, std: Tensor, dropout: float = 0.0) -> None:
        super().__init__()
        selection = torch.as_tensor(selection)
        weight = torch.as_tensor(weight)
        if selection.dim() != 1 or selection.dtype.is_floating_point or selection.dtype == torch.bool:
            raise ValueError(f"selection must be a 1-D integer tensor of channel indices, got dtype {selection.dtype} "
                             f"and shape {tuple(selection.shape)}")
        k = selection.numel()
        if weight.dim() != 2 or weight.shape[1] != k:
            raise ValueError(f"weight must have shape (C, k={k}) to match the selection, got {tuple(weight.shape)}")
        for name, v in (("mean", mean), ("std", std)):
            if torch.as_tensor(v).shape != (k,):
                raise ValueError(f"{name} must have shape (k={k},), got {tuple(torch.as_tensor(v).shape)}")
        if k == 0 or (selection < 0).any() or selection.unique().numel() != k:
            raise ValueError(f"selection must hold k >= 1 distinct non-negative channel indices, "
                             f"got {selection.tolist()}")
        if not ((weight == 0) | (weight == 1)).all():
            bad = weight[(weight != 0) & (weight != 1)].unique()[:5].tolist()
            raise ValueError(f"weight must be binary (only 0 and 1), found values such as {bad}")
        row_sums = weight.sum(dim=1)
        if (row_sums != row_sums[0]).any() or row_sums[0] < 1:
            counts = sorted({int(c) for c in row_sums.tolist()})
            raise ValueError(f"every row (class) of weight must have the same number m >= 1 of ones; "
                             f"found per-class counts {counts}")
        self.register_buffer("selection", selection.to(torch.long).clone())
        self.register_buffer("weight", weight.to(torch.float32).clone())
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], prefix: str = "", dropout: float = 0.0) -> SparseHead:
        """Rebuild (and re-validate) a head from a state_dict, e.g. `SparseHead.from_state_dict(sd, "head.")`."""
        return cls(selection=state[prefix + "selection"], weight=state[prefix + "weight"],
                   mean=state[prefix + "mean"], std=state[prefix + "std"], dropout=dropout)

    @property
    def n_features(self) -> int:
        """k, the number of selected features."""
        return self.selection.numel()

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def n_per_class(self) -> int:
        """m, the number of features each class uses (the row sum of W)."""
        return int(self.weight[0].sum().item())

    def standardise(self, features: Tensor) -> Tensor:
        """(f - mu) / max(sigma, 1e-6). Args: features (B, k). Returns: (B, k)."""
        return (features - self.mean) / self.std.clamp_min(STD_FLOOR)

    def contributions(self, features: Tensor) -> Tensor:
        """Per-class, per-feature contributions W_cj * z_j (no dropout: this is the explanation view).

        Args:
            features: selected pooled features, shape (B, k).

        Returns:
            Shape (B, C, k); summing over k gives exactly the (eval-mode) logits, because `forward` computes the
            logits with this same function.
        """
        return self.standardise(features).unsqueeze(1) * self.weight

    def forward(self, features: Tensor) -> Tensor:
        """Args: features (B, k). Returns: logits (B, C)."""
        # Summing the contributions (rather than a matmul) makes logits and explanations bit-identical; with k = 50
        # the (B, C, k) intermediate is small.
        return self.contributions(self.dropout(features)).sum(dim=-1)


class LinearProbe(nn.Module):
    """The linear-probe baseline (docs/method.md#baselines): Dropout, then Linear(D -> C) on the frozen CLS token.

    Parameters: D * C + C.

    Args:
        in_dim: backbone width D.
        n_classes: C.
        dropout: drop probability on the CLS vector (0.2 in the reference).
    """

    def __init__(self, *, in_dim: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, n_classes)

    def forward(self, cls: Tensor) -> Tensor:
        """Args: cls (B, D), e.g. `split_tokens(tokens)[1]`. Returns: logits (B, C)."""
        return self.linear(self.dropout(cls))
