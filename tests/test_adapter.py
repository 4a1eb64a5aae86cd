"""TokenMLP: shapes, non-negativity, BN over batch x tokens, parameter count."""

from __future__ import annotations

import pytest
import torch

from toolkit.config import AdapterConfig
from toolkit.model.adapter import TokenMLP, from_config, parameter_count


def test_shapes_and_non_negative_with_relu() -> None:
    torch.manual_seed(0)
    mlp = TokenMLP(in_dim=6, hidden_dim=10, out_dim=4, n_layers=3)
    out = mlp(torch.randn(2, 5, 6))
    assert out.shape == (2, 5, 4)
    assert (out >= 0).all()
    assert (out > 0).any()
    mlp.eval()
    assert (mlp(torch.randn(3, 7, 6)) >= 0).all()


def test_single_layer_is_linear_bn_act() -> None:
    mlp = TokenMLP(in_dim=6, hidden_dim=99, out_dim=4, n_layers=1)
    assert len(mlp.blocks) == 1
    block = mlp.blocks[0]
    assert (block.linear.in_features, block.linear.out_features) == (6, 4)
    assert isinstance(block.norm, torch.nn.BatchNorm1d) and block.norm.num_features == 4
    assert isinstance(block.act, torch.nn.ReLU)


def test_gelu_can_be_negative_and_no_bn() -> None:
    torch.manual_seed(0)
    mlp = TokenMLP(in_dim=6, hidden_dim=8, out_dim=4, n_layers=2, batch_norm=False, activation="gelu")
    assert all(b.norm is None for b in mlp.blocks)
    assert (mlp(torch.randn(4, 5, 6)) < 0).any()


def test_bn_statistics_pooled_over_batch_and_tokens() -> None:
    torch.manual_seed(0)
    mlp = TokenMLP(in_dim=3, hidden_dim=5, out_dim=4, n_layers=1)
    x = torch.randn(2, 6, 3) * 3 + 1
    x[:, -1] += 10.0  # a "CLS" token far from the patches: it must still enter the statistics
    mlp.train()
    mlp(x)
    bn = mlp.blocks[0].norm
    with torch.no_grad():
        y = mlp.blocks[0].linear(x).reshape(-1, 4)  # (B * L, F)
    expected_mean = 0.9 * 0.0 + 0.1 * y.mean(dim=0)
    expected_var = 0.9 * 1.0 + 0.1 * y.var(dim=0, unbiased=True)
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-5, atol=1e-6)
    # Stats over the patch tokens only (CLS excluded) would differ clearly.
    patches_only = y.reshape(2, 6, 4)[:, :-1].reshape(-1, 4).mean(dim=0) * 0.1
    assert not torch.allclose(bn.running_mean, patches_only, atol=1e-3)


def test_train_mode_output_is_batch_token_normalised() -> None:
    torch.manual_seed(0)
    mlp = TokenMLP(in_dim=3, hidden_dim=5, out_dim=4, n_layers=1, activation="gelu")
    mlp.blocks[0].act = torch.nn.Identity()  # look at the BN output directly
    out = mlp(torch.randn(3, 7, 3) * 5 + 2).reshape(-1, 4)
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


def test_parameter_count_paper_default() -> None:
    n = parameter_count(in_dim=768, hidden_dim=2048, out_dim=512, n_layers=4)
    by_hand = (768 * 2048 + 2048 + 2 * 2048) + 2 * (2048 * 2048 + 2048 + 2 * 2048) + (2048 * 512 + 512 + 2 * 512)
    assert n == by_hand == 11_030_016
    assert round(n / 1e6, 2) == 11.03


def test_parameter_count_matches_module() -> None:
    for kwargs in (dict(in_dim=7, hidden_dim=9, out_dim=5, n_layers=3),
                   dict(in_dim=7, hidden_dim=9, out_dim=5, n_layers=1, batch_norm=False)):
        mlp = TokenMLP(**kwargs)
        assert sum(p.numel() for p in mlp.parameters()) == parameter_count(**kwargs)


def test_from_config() -> None:
    cfg = AdapterConfig(n_layers=2, hidden_dim=16, n_features=8, activation="gelu", batch_norm=False)
    mlp = from_config(cfg, in_dim=12)
    assert (mlp.in_dim, mlp.hidden_dim, mlp.out_dim, mlp.n_layers) == (12, 16, 8, 2)
    assert mlp.n_features == 8 and isinstance(mlp.blocks[0].act, torch.nn.GELU)
    assert TokenMLP.from_config(cfg, 12).out_dim == 8


def test_rejects_bad_input() -> None:
    mlp = TokenMLP(in_dim=6, hidden_dim=8, out_dim=4, n_layers=2)
    with pytest.raises(ValueError, match=r"\(B, L, 6\)"):
        mlp(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="n_layers"):
        TokenMLP(in_dim=6, hidden_dim=8, out_dim=4, n_layers=0)
    with pytest.raises(ValueError, match="activation"):
        TokenMLP(in_dim=6, hidden_dim=8, out_dim=4, n_layers=1, activation="tanh")  # type: ignore[arg-type]
