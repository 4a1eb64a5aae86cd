"""The token-wise MLP adapter that turns frozen DINOv2 tokens into DINO-QPM features (docs/method.md#model).

The adapter is a stack of `n_layers` blocks, each Linear -> BatchNorm -> activation, the last block included, so with
ReLU every output feature is non-negative. It runs on every token independently, and its BatchNorm statistics are
pooled over batch x tokens (the CLS token included, as in the reference's `BatchNorm1dPermuted`).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from toolkit.config import AdapterConfig

Activation = Literal["relu", "gelu"]


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be one of 'relu', 'gelu', got {name!r}")


def parameter_count(*, in_dim: int, hidden_dim: int, out_dim: int, n_layers: int, batch_norm: bool = True) -> int:
    """Number of trainable parameters of a `TokenMLP` with these sizes, in closed form.

    With widths d_0 = in_dim, d_1 = ... = d_{n-1} = hidden_dim, d_n = out_dim, each block has a Linear with bias
    (d_{i-1} d_i + d_i) and, with batch norm, an affine BN (2 d_i). The paper default 768 -> 2048 x 3 -> 512
    (n_layers = 4) has 11,030,016 parameters (docs/method.md#model: "about 11.03 M").

    Args:
        in_dim: token width D.
        hidden_dim: width of the hidden blocks.
        out_dim: number of features F.
        n_layers: number of blocks (>= 1).
        batch_norm: whether each block has an affine BatchNorm.

    Returns:
        The parameter count (BN running statistics are buffers and not counted).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
    total = 0
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        total += d_in * d_out + d_out + (2 * d_out if batch_norm else 0)
    return total


class TokenBlock(nn.Module):
    """One adapter block: Linear, BatchNorm over batch x tokens, activation.

    The BatchNorm is a plain `nn.BatchNorm1d(out_dim)` applied to the (B * L, F) view of the tokens. That pools
    statistics over the same B * L values as the reference's BatchNorm1d on the (B, F, L) permuted view (the running
    variance uses the same n = B * L), and keeping the module a plain BatchNorm1d means
    `nn.SyncBatchNorm.convert_sync_batchnorm` and BN folding at export both work on it unchanged.

    Parameters: in_dim * out_dim + out_dim (Linear), plus 2 * out_dim (BN affine) when batch_norm is on.
    """

    def __init__(self, *, in_dim: int, out_dim: int, batch_norm: bool, activation: Activation) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm: nn.BatchNorm1d | None = nn.BatchNorm1d(out_dim) if batch_norm else None
        if batch_norm:
            # BatchNorm subtracts the mean of every channel, so a bias in front of it cancels exactly and its true
            # gradient is 0. Training it anyway lets AdamW turn rounding noise into lr-sized steps, which is all that
            # differs between N ranks and one process; it stays (for the parameter count and the checkpoint layout)
            # but is frozen.
            self.linear.bias.requires_grad_(False)
        self.act = _activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block token-wise.

        Args:
            x: tokens, shape (B, L, D_in).

        Returns:
            Shape (B, L, D_out).
        """
        y = self.linear(x)
        if self.norm is not None:
            b, n_tokens, f = y.shape
            y = self.norm(y.reshape(b * n_tokens, f)).reshape(b, n_tokens, f)
        return self.act(y)


class TokenMLP(nn.Module):
    """Token-wise MLP adapter: `n_layers` x (Linear, BN over batch x tokens, activation), the last block included.

    Widths are in_dim -> hidden_dim x (n_layers - 1) -> out_dim; with n_layers = 1 it is Linear(in_dim -> out_dim),
    BN, activation. Parameter count: see `parameter_count` (11,030,016 for 768 -> 2048 x 3 -> 512).

    Args:
        in_dim: token width D of the backbone.
        hidden_dim: width of the hidden blocks (unused when n_layers = 1).
        out_dim: number of output features F.
        n_layers: number of blocks, >= 1.
        batch_norm: put a BatchNorm (statistics over batch x tokens) after each Linear.
        activation: "relu" (reference default; outputs are >= 0) or "gelu".
    """

    def __init__(
        self,
        *,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        n_layers: int,
        batch_norm: bool = True,
        activation: Activation = "relu",
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        for name, v in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
        self.n_layers = n_layers
        self.batch_norm = batch_norm
        self.activation = activation
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
        self.blocks = nn.ModuleList(
            TokenBlock(in_dim=d_in, out_dim=d_out, batch_norm=batch_norm, activation=activation)
            for d_in, d_out in zip(dims[:-1], dims[1:])
        )

    @classmethod
    def from_config(cls, cfg: AdapterConfig, in_dim: int) -> TokenMLP:
        """Build the adapter described by `cfg` for tokens of width `in_dim` (the module-level `from_config`)."""
        return from_config(cfg, in_dim)

    @property
    def n_features(self) -> int:
        """F, the number of output features (= out_dim)."""
        return self.out_dim

    def forward(self, tokens: Tensor) -> Tensor:
        """Run every token through the MLP.

        Args:
            tokens: shape (B, L, D). In training mode BN needs B * L > 1.

        Returns:
            Features per token, shape (B, L, F); non-negative with ReLU.
        """
        if tokens.dim() != 3 or tokens.shape[-1] != self.in_dim:
            raise ValueError(f"TokenMLP expects tokens of shape (B, L, {self.in_dim}), got {tuple(tokens.shape)}")
        x = tokens
        for block in self.blocks:
            x = block(x)
        return x

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, out_dim={self.out_dim}, "
                f"n_layers={self.n_layers}, batch_norm={self.batch_norm}, activation={self.activation!r}")


def from_config(cfg: AdapterConfig, in_dim: int) -> TokenMLP:
    """Build a `TokenMLP` from the adapter section of the run config.

    Args:
        cfg: layer count, widths, BN and activation.
        in_dim: token width D of the backbone (384 ViT-S, 768 ViT-B, ...).

    Returns:
        A freshly initialised adapter mapping (B, L, in_dim) -> (B, L, cfg.n_features).
    """
    return TokenMLP(
        in_dim=in_dim,
        hidden_dim=cfg.hidden_dim,
        out_dim=cfg.n_features,
        n_layers=cfg.n_layers,
        batch_norm=cfg.batch_norm,
        activation=cfg.activation,
    )


__all__ = ["TokenBlock", "TokenMLP", "from_config", "parameter_count"]
