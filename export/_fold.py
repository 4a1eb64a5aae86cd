"""Folding a trained DINO-QPM model so the deployed graph does only the work the prediction needs.

Three exact rewrites of the eval-mode model (adapter and head of the paper, arXiv 2604.07166):
1. Each adapter block Linear -> BatchNorm1d (running statistics) becomes one Linear:
   W' = diag(s) W, b' = s (b - running_mean) + beta with s = gamma / sqrt(running_var + eps).
2. The last block keeps only the k selected output channels. Its BatchNorm and activation act per channel, so pruning
   after folding changes nothing for the kept channels; the other F - k maps are never computed.
3. The standardisation is folded into the binary head: sum_j W_cj (f_j - mu_j) / sigma_j = (W') f + b with
   W'_cj = W_cj / sigma_j and b_c = -sum_j W'_cj mu_j (sigma floored at 1e-6 as in `SparseHead`).
In eval mode BatchNorm uses running statistics, so the CLS token, which the adapter sees only for the statistics of
training-mode BN, no longer influences the patch outputs and the folded adapter drops it.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from toolkit.model import STD_FLOOR, DinoQPM, SparseHead
from toolkit.model.adapter import TokenMLP


@torch.no_grad()
def fold_batchnorm(linear: nn.Linear, norm: nn.BatchNorm1d | None) -> nn.Linear:
    """A new Linear equal to `norm(linear(x))` with `norm` in eval mode (a copy of `linear` if there is no norm).

    Args:
        linear: Linear(D_in -> D_out).
        norm: BatchNorm1d(D_out) with running statistics, or None.

    Returns:
        Linear(D_in -> D_out) with bias, in the dtype of `linear`; the arithmetic runs in float64, so folding adds
        nothing beyond one final rounding.
    """
    out = nn.Linear(linear.in_features, linear.out_features, bias=True)
    weight = linear.weight.double()
    bias = linear.bias.double() if linear.bias is not None else torch.zeros(linear.out_features, dtype=torch.float64)
    if norm is not None:
        if norm.running_mean is None or norm.running_var is None:
            raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)
        if norm.affine:
            scale = scale * norm.weight.double()
        shift = norm.bias.double() if norm.affine else torch.zeros_like(scale)
        weight = weight * scale[:, None]
        bias = (bias - norm.running_mean.double()) * scale + shift
    out.weight.copy_(weight.to(linear.weight.dtype))
    out.bias.copy_(bias.to(linear.weight.dtype))
    return out


class FoldedAdapter(nn.Module):
    """The adapter after folding: Linear -> activation blocks, the last one with k output channels.

    Parameters: sum over blocks of d_in * d_out + d_out, with d_out = k for the last block.

    Args:
        linears: the folded Linear layers, first to last (the last already pruned to the selected channels).
        activation: the adapter's activation module (ReLU or GELU), shared by every block.
    """

    def __init__(self, *, linears: list[nn.Linear], activation: nn.Module) -> None:
        super().__init__()
        self.linears = nn.ModuleList(linears)
        self.act = activation

    @property
    def out_dim(self) -> int:
        return self.linears[-1].out_features

    def forward(self, tokens: Tensor) -> Tensor:
        """Args: tokens (B, L, D). Returns: (B, L, k), the selected channels in selection order."""
        x = tokens
        for linear in self.linears:
            x = self.act(linear(x))
        return x


class FoldedHead(nn.Module):
    """The sparse head after folding the standardisation: logits = f W'^T + b.

    Parameters: C * k + C.

    Args:
        weight: W' = W / max(sigma, 1e-6), shape (C, k).
        bias: b = -W' mu, shape (C,).
    """

    def __init__(self, *, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, features: Tensor) -> Tensor:
        """Args: features (B, k). Returns: logits (B, C)."""
        return self.linear(features)


@torch.no_grad()
def fold_adapter(adapter: TokenMLP, selection: Tensor) -> FoldedAdapter:
    """Fold every block's BatchNorm into its Linear and prune the last Linear to `selection`.

    Args:
        adapter: the trained adapter (its BN running statistics are used; the train/eval flag is irrelevant).
        selection: adapter output channels to keep, shape (k,), in the order of the head's columns.
    """
    linears = [fold_batchnorm(block.linear, block.norm) for block in adapter.blocks]
    last = linears[-1]
    pruned = nn.Linear(last.in_features, selection.numel())
    idx = selection.to(torch.long).cpu()
    pruned.weight.copy_(last.weight[idx])
    pruned.bias.copy_(last.bias[idx])
    linears[-1] = pruned
    return FoldedAdapter(linears=linears, activation=copy.deepcopy(adapter.blocks[0].act))


@torch.no_grad()
def fold_head(head: SparseHead) -> FoldedHead:
    """Fold mean/std into the binary head: one (C, k) matrix plus a bias (module docstring, rewrite 3)."""
    std = head.std.double().clamp_min(STD_FLOOR)
    weight = head.weight.double() / std
    bias = -(weight @ head.mean.double())
    return FoldedHead(weight=weight.float(), bias=bias.float())


class FoldedQPM(nn.Module):
    """Folded adapter + average pooling + folded head, on patch tokens only.

    Args:
        adapter: `fold_adapter(...)`.
        head: `fold_head(...)`.
        selection: the adapter channels behind the k features (kept for reports; not used in `forward`).
    """

    selection: Tensor

    def __init__(self, *, adapter: FoldedAdapter, head: FoldedHead, selection: Tensor) -> None:
        super().__init__()
        self.adapter = adapter
        self.head = head
        self.register_buffer("selection", selection.to(torch.long).clone(), persistent=False)

    def forward(self, patch: Tensor, grid: tuple[int, int] | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Args: patch tokens (B, P, D) row-major over grid (h, w).

        Returns:
            logits (B, C), feature_maps (B, k, h, w), features (B, k): the same outputs as `DinoQPM.forward` (in
            another order) without the CLS token.
        """
        z = self.adapter(patch)  # (B, P, k)
        b, _, k = z.shape
        maps = z.transpose(1, 2).reshape(b, k, grid[0], grid[1])
        features = maps.mean(dim=(2, 3))
        return self.head(features), maps, features


def fold_model(model: DinoQPM) -> FoldedQPM:
    """The folded equivalent of a DINO-QPM model with a sparse head (eval mode).

    Raises:
        ValueError: the model has a dense head (export needs the QPM model of RUN_DIR/checkpoint).
    """
    if not isinstance(model.head, SparseHead):
        raise ValueError("folding needs the DINO-QPM model with its sparse head, not the dense model")
    folded = FoldedQPM(adapter=fold_adapter(model.adapter, model.head.selection), head=fold_head(model.head),
                       selection=model.head.selection)
    return folded.eval()


def tensor_elements(module: nn.Module) -> int:
    """Floating-point numbers a module stores (parameters and float buffers such as BN running statistics).

    Integer buffers (BN's step counter, the head's channel indices) are left out: they are bookkeeping, not weights.
    """
    tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
    return sum(t.numel() for t in tensors)


__all__ = ["FoldedAdapter", "FoldedHead", "FoldedQPM", "fold_adapter", "fold_batchnorm", "fold_head", "fold_model",
           "tensor_elements"]
