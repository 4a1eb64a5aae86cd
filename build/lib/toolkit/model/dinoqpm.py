"""The DINO-QPM model on cached tokens: adapter, average pooling, and a dense or sparse (QPM) head.

Token layout (docs/method.md#model): the model input is (B, P + 1, D), the P patch tokens in row-major order followed by
the CLS token as the LAST token. The adapter sees all P + 1 tokens, so its BatchNorm statistics include the CLS token
exactly as in the reference, but only the P patch outputs become feature maps.

Every consumer (training loop, metrics, explanations, ONNX export) goes through the same surface:
`feature_maps` -> `pool` -> `logits`, composed by `forward`, so an explanation comes from the code that predicts.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from toolkit.config import AdapterConfig
from toolkit.model.adapter import TokenMLP
from toolkit.model.heads import DenseHead, LinearProbe, SparseHead


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


class DinoQPM(nn.Module):
    """Adapter + average pooling + head, on (B, P + 1, D) tokens.

    Parameters: the adapter's (`toolkit.model.adapter.parameter_count`, 11.03 M for the paper default) plus
    F * C + C for a dense head or 0 trainable for a sparse head.

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
        """Adapter outputs of the patch tokens, as maps (docs/method.md#model).

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
