"""The DINO-QPM model on cached tokens: adapter, average pooling, and a dense or sparse (QPM) head.

Token layout (dino_qpm.md §1.3): the model input is (B, P + 1, D), the P patch tokens in row-major order followed by
the CLS token as the LAST token. The adapter sees all P + 1 tokens, so its BatchNorm statistics include the CLS token
exactly as in the reference, but only the P patch outputs become feature maps.

Every consumer (training loop, metrics, explanations, ONNX export) goes through the same surface:
`feature_maps` -> `pool` -> `logits`, composed by `forward`, so an explanation comes from the code that predicts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from toolkit.adapter import TokenMLP
from toolkit.config import AdapterConfig

STD_FLOOR = 1e-6  # the reference's max(sigma, 1e-6) guard against dead features (dino_qpm.md §1.8)


def join_tokens(patch: Tensor, cls: Tensor) -> Tensor:
    """Build the adapter input: patch tokens with CLS appended as the last token.

    Args:
        patch: patch tokens, shape (B, P, D), row-major over the (h, w) grid.
        cls: CLS tokens, shape (B, D).

    Returns:
        Shape (B, P + 1, D).
    """
    if patch.dim() != 3 or cls.dim() != 2 or patch.shape[0] != cls.shape[0] or patch.shape[2] != cls.shape[1]:
        raise ValueError(f"join_tokens expects patch (B, P, D) and cls (B, D), got {tuple(patch.shape)} and "
                         f"{tuple(cls.shape)}")
    return torch.cat([patch, cls.unsqueeze(1)], dim=1)


def split_tokens(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of `join_tokens`: (B, P + 1, D) -> patch (B, P, D), cls (B, D)."""
    return tokens[:, :-1], tokens[:, -1]


class DenseHead(nn.Module):
    """Dense head of phase 1 (dino_qpm.md §1.7): Dropout on the pooled vector, then Linear(F -> C) with bias.

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
    """The QPM head (dino_qpm.md §1.8): k selected features, standardised, and a binary class-feature matrix.

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
    """The linear-probe baseline (dino_qpm.md §2.6): Dropout, then Linear(D -> C) on the frozen CLS token.

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


class DinoQPM(nn.Module):
    """Adapter + average pooling + head, on (B, P + 1, D) tokens.

    Parameters: the adapter's (`toolkit.adapter.parameter_count`, 11.03 M for the paper default) plus F * C + C for a
    dense head or 0 trainable for a sparse head.

    Args:
        adapter: the token-wise MLP, (B, L, D) -> (B, L, F).
        head: `DenseHead` over all F features, or `SparseHead` over its k selected channels.
        grid: (h, w) patch grid, h * w = P (16 x 16 for 224 px and patch 14).
    """

    def __init__(self, *, adapter: TokenMLP, head: DenseHead | SparseHead, grid: tuple[int, int]) -> None:
        super().__init__()
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be (h, w) with h, w >= 1, got {grid}")
        if isinstance(head, SparseHead):
            if int(head.selection.max()) >= adapter.out_dim:
                raise ValueError(f"sparse head selects channel {int(head.selection.max())} but the adapter has only "
                                 f"{adapter.out_dim} features")
        elif head.n_features != adapter.out_dim:
            raise ValueError(f"dense head expects {head.n_features} features but the adapter gives {adapter.out_dim}")
        self.adapter = adapter
        self.head = head
        self.grid = (int(grid[0]), int(grid[1]))

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.head, SparseHead)

    @property
    def n_features(self) -> int:
        """F' = the number of feature maps and pooled features: F dense, k sparse."""
        return self.head.n_features

    @property
    def n_classes(self) -> int:
        return self.head.n_classes

    def feature_maps(self, tokens: Tensor) -> Tensor:
        """Adapter outputs of the patch tokens, as maps (dino_qpm.md §1.6).

        Args:
            tokens: shape (B, P + 1, D), patches row-major then CLS last; P must equal h * w.

        Returns:
            Shape (B, F', h, w) with map[b, j, r, c] = adapter output of patch r * w + c; for a sparse head only the
            selected channels, in selection order.
        """
        h, w = self.grid
        if tokens.dim() != 3 or tokens.shape[1] != h * w + 1:
            raise ValueError(f"expected tokens (B, P + 1 = {h * w + 1}, D) for grid {self.grid} (patches then CLS), "
                             f"got {tuple(tokens.shape)}")
        weight = self.adapter.blocks[0].linear.weight
        if tokens.dtype != weight.dtype:  # cached tokens are fp16; autocast, if active, still decides compute dtype
            tokens = tokens.to(weight.dtype)
        z = self.adapter(tokens)[:, :-1]  # (B, P, F): the CLS output only served the BN statistics
        if isinstance(self.head, SparseHead):
            z = z.index_select(-1, self.head.selection)
        b, _, f = z.shape
        return z.transpose(1, 2).reshape(b, f, h, w)

    @staticmethod
    def pool(maps: Tensor) -> Tensor:
        """Average pooling, so every feature is exactly the mean of its map.

        Args:
            maps: shape (B, F', h, w).

        Returns:
            Shape (B, F').
        """
        return maps.mean(dim=(2, 3))

    def logits(self, features: Tensor) -> Tensor:
        """Args: features (B, F'). Returns: logits (B, C)."""
        return self.head(features)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Args: tokens (B, P + 1, D). Returns: logits (B, C), features (B, F') before dropout, maps (B, F', h, w)."""
        maps = self.feature_maps(tokens)
        features = self.pool(maps)
        return self.logits(features), features, maps

    def head_weight(self) -> Tensor:
        """The class-feature matrix the diversity loss reads, shape (C, F'): dense Linear weight or binary W."""
        return self.head.weight

    def to_sparse(self, head: SparseHead, *, share_adapter: bool = False) -> DinoQPM:
        """A new model with the same adapter (deep-copied unless `share_adapter`) and the sparse QPM head.

        Copying by default keeps the dense model intact while the sparse one is fine-tuned.
        """
        adapter = self.adapter if share_adapter else copy.deepcopy(self.adapter)
        return DinoQPM(adapter=adapter, head=head.to(self.adapter.blocks[0].linear.weight.device), grid=self.grid)


def build_dense_model(cfg: AdapterConfig, *, in_dim: int, n_classes: int, dropout: float,
                      grid: tuple[int, int]) -> DinoQPM:
    """A freshly initialised phase-1 model: `TokenMLP.from_config(cfg, in_dim)` plus a `DenseHead`."""
    adapter = TokenMLP.from_config(cfg, in_dim)
    return DinoQPM(adapter=adapter, head=DenseHead(n_features=cfg.n_features, n_classes=n_classes, dropout=dropout),
                   grid=grid)


__all__ = ["DenseHead", "DinoQPM", "LinearProbe", "SparseHead", "build_dense_model", "join_tokens", "split_tokens"]
