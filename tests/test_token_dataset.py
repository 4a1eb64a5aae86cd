"""Token batches without the patch tokens: what a linear probe reads (CLS only), so neither its training nor its
evaluation touches patch.npy (64x the CLS tokens on disk), with the same batches and logits as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.artifacts import Manifest, describe_files
from toolkit.cache import StoreRows, TokenStore
from toolkit.model import DenseHead, DinoQPM, LinearProbe, TokenMLP
from toolkit.train import evaluate, reads_patches

N, P, D, C = 40, 4, 8, 3


class _Unreadable:
    """Stands for patch.npy: any read fails, so a test can tell whether the patch tokens were touched."""

    shape = (N, P, D)

    def __getitem__(self, index: object) -> np.ndarray:
        raise AssertionError("patch tokens were read")


def _store(d: Path) -> TokenStore:
    rng = np.random.default_rng(0)
    d.mkdir(parents=True)
    np.save(d / "patch.npy", rng.standard_normal((N, P, D)).astype(np.float16))
    np.save(d / "cls.npy", rng.standard_normal((N, D)).astype(np.float16))
    np.save(d / "labels.npy", rng.integers(0, C, N).astype(np.int64))
    (d / "meta.json").write_text(json.dumps({"classes": ["a", "b", "c"], "grid": [2, 2]}))
    Manifest(stage="tokens", key=d.name, config={}, files=describe_files(d)).write(d)
    return TokenStore(d, d.name)


def test_batches_without_patches_hold_the_same_rows_and_never_read_patch_npy(tmp_path: Path) -> None:
    store = _store(tmp_path / "tokens")
    rows = np.array([1, 5, 6, 30, 39])
    view = StoreRows(store, rows, "view")
    order = [3, 0, 4]  # a shuffled batch
    full, lean = view.dataset().__getitems__(order), view.dataset(patch=False).__getitems__(order)
    assert "patch" in full and "patch" not in lean
    for key in ("cls", "label", "index"):
        assert torch.equal(full[key], lean[key]), key
    assert torch.equal(full["cls"], torch.from_numpy(store.cls[rows[order]].astype(np.float32)))
    store.__dict__["patch"] = _Unreadable()  # from here on, any read of patch.npy fails
    view.dataset(patch=False).__getitems__(order)
    with pytest.raises(AssertionError, match="patch tokens were read"):
        view.dataset().__getitems__(order)


def test_a_probe_evaluates_alike_without_patches_and_a_dinoqpm_asks_for_them(tmp_path: Path) -> None:
    store = _store(tmp_path / "tokens")
    probe = LinearProbe(in_dim=D, n_classes=C, dropout=0.0).eval()
    qpm = DinoQPM(adapter=TokenMLP(in_dim=D, hidden_dim=6, out_dim=5, n_layers=2),
                  head=DenseHead(n_features=5, n_classes=C, dropout=0.0), grid=(2, 2)).eval()
    assert not reads_patches(probe) and reads_patches(qpm)
    cpu = torch.device("cpu")
    with torch.no_grad():
        want = evaluate(probe, store.dataset(), batch_size=16, device=cpu, head_inputs=True)
        store.__dict__["patch"] = _Unreadable()
        got = evaluate(probe, store.dataset(patch=reads_patches(probe)), batch_size=16, device=cpu, head_inputs=True)
        assert np.array_equal(want.logits, got.logits) and np.array_equal(want.features, got.features)
        with pytest.raises(AssertionError, match=r"dataset\(patch=True\)"):
            evaluate(qpm, store.dataset(patch=False), batch_size=16, device=cpu)
