"""DinoQPM surface, DenseHead, SparseHead and LinearProbe on tiny random tokens."""

from __future__ import annotations

import pytest
import torch

from toolkit.config import AdapterConfig
from toolkit.model import (
    DenseHead,
    DinoQPM,
    LinearProbe,
    SparseHead,
    build_dense_model,
    join_tokens,
    split_tokens,
)
from toolkit.model.adapter import TokenMLP

D, F, C, GRID = 6, 8, 3, (2, 3)
P = GRID[0] * GRID[1]


def _dense_model(seed: int = 0) -> DinoQPM:
    torch.manual_seed(seed)
    adapter = TokenMLP(in_dim=D, hidden_dim=10, out_dim=F, n_layers=2)
    return DinoQPM(adapter=adapter, head=DenseHead(n_features=F, n_classes=C, dropout=0.0), grid=GRID)


def _sparse_head(selection: list[int] | None = None) -> SparseHead:
    selection = selection or [5, 1, 6, 2]
    weight = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.float32)  # m = 2 per class
    return SparseHead(selection=torch.tensor(selection), weight=weight,
                      mean=torch.tensor([0.5, 0.1, 0.2, 0.3]), std=torch.tensor([2.0, 0.5, 1e-9, 1.0]))


def _tokens(b: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, P + 1, D, generator=g)


def test_join_and_split_tokens() -> None:
    patch, cls = torch.randn(2, P, D), torch.randn(2, D)
    tokens = join_tokens(patch, cls)
    assert tokens.shape == (2, P + 1, D)
    assert torch.equal(tokens[:, -1], cls) and torch.equal(tokens[:, :P], patch)
    p2, c2 = split_tokens(tokens)
    assert torch.equal(p2, patch) and torch.equal(c2, cls)
    with pytest.raises(ValueError, match="cls"):
        join_tokens(patch, torch.randn(3, D))


def test_forward_shapes_and_pooled_maps_equal_features() -> None:
    model = _dense_model()
    logits, features, maps = model(_tokens())
    assert logits.shape == (4, C) and features.shape == (4, F) and maps.shape == (4, F, *GRID)
    assert torch.equal(model.pool(maps), features)
    assert torch.equal(model.logits(features), logits)  # dropout 0: the head is deterministic


def test_maps_are_patch_outputs_row_major_without_cls() -> None:
    model = _dense_model().eval()
    tokens = _tokens()
    z = model.adapter(tokens)  # (B, P + 1, F)
    maps = model.feature_maps(tokens)
    h, w = GRID
    for r in range(h):
        for c in range(w):
            assert torch.equal(maps[:, :, r, c], z[:, r * w + c])
    torch.testing.assert_close(model.pool(maps), z[:, :P].mean(dim=1))
    # CLS output is not pooled: changing only the CLS token leaves eval-mode maps unchanged.
    tokens2 = tokens.clone()
    tokens2[:, -1] += 5.0
    assert torch.equal(model.feature_maps(tokens2), maps)


def test_cls_enters_train_mode_bn_statistics() -> None:
    model = _dense_model().train()
    tokens = _tokens()
    tokens2 = tokens.clone()
    tokens2[:, -1] += 5.0
    assert not torch.allclose(model.feature_maps(tokens), model.feature_maps(tokens2))


def test_rejects_wrong_token_count() -> None:
    with pytest.raises(ValueError, match="patches then CLS"):
        _dense_model().feature_maps(torch.randn(2, P, D))


def test_sparse_maps_in_selection_order() -> None:
    dense = _dense_model().eval()
    sparse = dense.to_sparse(_sparse_head([5, 1, 6, 2])).eval()
    tokens = _tokens()
    dense_maps = dense.feature_maps(tokens)
    logits, features, maps = sparse(tokens)
    assert maps.shape == (4, 4, *GRID) and features.shape == (4, 4) and logits.shape == (4, C)
    assert torch.equal(maps, dense_maps[:, [5, 1, 6, 2]])
    assert torch.equal(sparse.pool(maps), features)
    assert sparse.is_sparse and sparse.n_features == 4 and sparse.n_classes == C
    assert torch.equal(sparse.head_weight(), sparse.head.weight) and sparse.head_weight().shape == (C, 4)
    assert dense.head_weight().shape == (C, F)


def test_to_sparse_copies_adapter_unless_shared() -> None:
    dense = _dense_model()
    copied = dense.to_sparse(_sparse_head())
    shared = dense.to_sparse(_sparse_head(), share_adapter=True)
    assert shared.adapter is dense.adapter and copied.adapter is not dense.adapter
    with torch.no_grad():
        copied.adapter.blocks[0].linear.weight.add_(1.0)
    assert not torch.equal(copied.adapter.blocks[0].linear.weight, dense.adapter.blocks[0].linear.weight)


def test_sparse_head_normalisation_numerically() -> None:
    head = _sparse_head()
    f = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # z_j = (f_j - mu_j) / max(sigma_j, 1e-6); sigma_2 = 1e-9 is floored to 1e-6.
    z = [(1.0 - 0.5) / 2.0, (2.0 - 0.1) / 0.5, (3.0 - 0.2) / 1e-6, (4.0 - 0.3) / 1.0]
    expected = torch.tensor([[z[0] + z[1], z[1] + z[2], z[2] + z[3]]])
    torch.testing.assert_close(head(f), expected, rtol=1e-6, atol=0)


def test_contributions_sum_to_logits_exactly() -> None:
    head = _sparse_head()
    f = torch.randn(5, 4)
    contrib = head.contributions(f)
    assert contrib.shape == (5, C, 4)
    assert torch.equal(contrib.sum(dim=-1), head(f))
    assert torch.equal(contrib[:, 0, 2:], torch.zeros(5, 2))  # class 0 uses features 0 and 1 only
    assert head.n_per_class == 2


def test_sparse_head_has_no_trainable_parameters_and_saves_buffers() -> None:
    head = _sparse_head()
    assert list(head.parameters()) == []
    assert set(head.state_dict()) == {"selection", "weight", "mean", "std"}
    assert head.selection.dtype == torch.long


def test_sparse_head_rejects_non_binary_weight() -> None:
    w = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match="binary"):
        SparseHead(selection=torch.tensor([0, 1]), weight=w, mean=torch.zeros(2), std=torch.ones(2))


def test_sparse_head_rejects_unequal_row_sums() -> None:
    w = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match=r"same number m >= 1 of ones.*\[1, 2\]"):
        SparseHead(selection=torch.tensor([0, 1, 2]), weight=w, mean=torch.zeros(3), std=torch.ones(3))
    with pytest.raises(ValueError, match="same number m >= 1"):
        SparseHead(selection=torch.tensor([0, 1]), weight=torch.zeros(2, 2), mean=torch.zeros(2), std=torch.ones(2))


def test_sparse_head_rejects_shape_mismatch_and_bad_selection() -> None:
    w = torch.eye(2)
    with pytest.raises(ValueError, match="weight must have shape"):
        SparseHead(selection=torch.tensor([0, 1, 2]), weight=w, mean=torch.zeros(3), std=torch.ones(3))
    with pytest.raises(ValueError, match="mean must have shape"):
        SparseHead(selection=torch.tensor([0, 1]), weight=w, mean=torch.zeros(3), std=torch.ones(2))
    with pytest.raises(ValueError, match="distinct"):
        SparseHead(selection=torch.tensor([1, 1]), weight=w, mean=torch.zeros(2), std=torch.ones(2))
    with pytest.raises(ValueError, match="only 3 features"):
        adapter = TokenMLP(in_dim=D, hidden_dim=4, out_dim=3, n_layers=1)
        DinoQPM(adapter=adapter, head=SparseHead(selection=torch.tensor([0, 3]), weight=w, mean=torch.zeros(2),
                                                 std=torch.ones(2)), grid=GRID)


def test_sparse_state_dict_round_trip_reproduces_logits() -> None:
    model = _dense_model(seed=0).to_sparse(_sparse_head([7, 0, 3, 4])).eval()
    tokens = _tokens()
    expected = model(tokens)[0]
    state = model.state_dict()
    head = SparseHead.from_state_dict(state, prefix="head.")
    fresh = DinoQPM(adapter=TokenMLP(in_dim=D, hidden_dim=10, out_dim=F, n_layers=2), head=head, grid=GRID)
    fresh.load_state_dict(state)
    fresh.eval()
    assert torch.equal(fresh.head.selection, torch.tensor([7, 0, 3, 4]))
    assert torch.equal(fresh(tokens)[0], expected)


def test_build_dense_model_and_gradients_reach_adapter() -> None:
    cfg = AdapterConfig(n_layers=2, hidden_dim=12, n_features=F)
    model = build_dense_model(cfg, in_dim=D, n_classes=C, dropout=0.2, grid=GRID)
    logits, _, _ = model(_tokens())
    logits.sum().backward()
    assert model.adapter.blocks[0].linear.weight.grad is not None
    assert model.head.weight.grad is not None


def test_fp16_tokens_are_accepted() -> None:
    model = _dense_model().eval()
    tokens = _tokens()
    out16 = model(tokens.half())[0]
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, model(tokens.half().float())[0])


def test_linear_probe() -> None:
    probe = LinearProbe(in_dim=D, n_classes=C, dropout=0.2)
    assert sum(p.numel() for p in probe.parameters()) == D * C + C
    probe.eval()
    cls = split_tokens(_tokens())[1]
    torch.testing.assert_close(probe(cls), cls @ probe.linear.weight.T + probe.linear.bias)
