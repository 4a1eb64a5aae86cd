"""End to end on the tiny config: every stage runs, artefacts are reused, the run directory explains itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from toolkit.config import load_config
from toolkit.model import DinoQPM, SparseHead, load_checkpoint
from toolkit.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_end_to_end_then_fully_cached(tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides)
    first = run_pipeline(cfg)
    assert first.backbone_builds == 1
    metrics = json.loads((first.run_dir / "metrics.json").read_text())
    for model in ("linear_probe", "dense", "qpm"):
        assert 0.0 <= metrics[model]["accuracy"] <= 1.0
    assert metrics["qp"]["status"] in ("optimal", "time_limit", "heuristic")
    # The run directory explains itself.
    assert yaml.safe_load((first.run_dir / "config.yaml").read_text())["qp"]["n_features"] == cfg.qp.n_features
    manifest = json.loads((first.run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) >= {"tokens_train", "tokens_test", "probe", "dense", "qp", "finetune"}
    # The checkpoint alone rebuilds the sparse model: k selected features, exactly m per class.
    model, info = load_checkpoint(first.run_dir / "checkpoint")
    assert isinstance(model, DinoQPM) and isinstance(model.head, SparseHead)
    w = model.head.weight
    assert w.shape == (cfg.data.num_classes, cfg.qp.n_features)
    assert torch.all(w.sum(1) == cfg.qp.n_per_class)
    assert info["classes"] and info["backbone"] == cfg.backbone.name

    assert not any(stage["cached"] for stage in manifest["stages"].values())
    second = run_pipeline(cfg)  # same config: no backbone, same numbers
    assert second.backbone_builds == 0
    assert all(stage["cached"] for stage in second.stages.values())
    assert json.loads((second.run_dir / "metrics.json").read_text()) == metrics


def test_changed_key_rebuilds_tokens(tiny_overrides: list[str]) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*tiny_overrides, "dense.epochs=1", "finetune.epochs=1"])
    assert run_pipeline(cfg, until="tokens").backbone_builds == 1
    assert run_pipeline(cfg, until="tokens").backbone_builds == 0
    other = load_config(ROOT / "configs" / "tiny.yaml", [*tiny_overrides, "data.image_size=28",
                                                          "runtime.run_name=other"])
    assert run_pipeline(other, until="tokens").backbone_builds == 1


def test_run_dir_with_other_config_is_not_overwritten(tiny_overrides: list[str]) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*tiny_overrides, "runtime.run_name=fixed"])
    run = run_pipeline(cfg, until="tokens")
    before = (run.run_dir / "config.yaml").read_text()
    other = load_config(ROOT / "configs" / "tiny.yaml", [*tiny_overrides, "runtime.run_name=fixed", "dense.lr=0.5"])
    with pytest.raises(FileExistsError, match="run_name"):
        run_pipeline(other, until="tokens")
    assert (run.run_dir / "config.yaml").read_text() == before
