"""End to end on the tiny config: every stage runs, artefacts are reused, the run directory explains itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from toolkit.config import load_config, replace
from toolkit.data import SPLITS
from toolkit.model import DinoQPM, SparseHead, load_checkpoint
from toolkit.pipeline import config_hash, run_dir_for, run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_end_to_end_then_fully_cached(tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides)
    first = run_pipeline(cfg)
    assert first.backbone_builds == 1
    metrics = json.loads((first.run_dir / "metrics.json").read_text())
    # The shapes are separable: dense and DINO-QPM are far above chance (1/4); the probe reads the CLS token of a
    # random-init ViT, which barely depends on the image, so it is only checked to be a probability.
    for split in ("val", "test"):
        assert metrics["dense"][split]["accuracy"] >= 0.75 and metrics["dino_qpm"][split]["accuracy"] >= 0.75
        assert 0.0 <= metrics["linear_probe"][split]["accuracy"] <= 1.0
        # SID@5 needs 5 features per class; with m = 2 it is undefined (null), never a made-up number.
        assert metrics["dino_qpm"][split]["sid_at_5"] is None
    cert = metrics["qp_certificate"]
    assert cert["gap"] >= 0 and cert["objective"] <= cert["bound"] + 1e-9
    # The validation split: 2 of each class's 10 train images, recorded with its seed in metrics and manifest.
    assert metrics["validation"] == {**metrics["validation"], "held_out": True, "fraction": 0.2,
                                     "seed": cfg.data.seed, "n_val": 8, "n_fit": 32}
    # The run directory explains itself.
    assert yaml.safe_load((first.run_dir / "config.yaml").read_text())["qp"]["n_features"] == cfg.qp.n_features
    manifest = json.loads((first.run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) >= {"tokens_train", "tokens_test", "probe", "dense", "select", "finetune"}
    assert manifest["validation"] == metrics["validation"]
    # Each training stage's key names the validation draw (the token store's does not: same images either way).
    assert json.loads((Path(manifest["stages"]["dense"]["directory"]) / "manifest.json").read_text())[
        "upstream"]["val"].endswith(":val")
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


def test_sid_at_5_is_measured_when_each_class_has_5_features(tiny_overrides: list[str]) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*tiny_overrides, "qp.n_features=6", "qp.n_per_class=5"])
    metrics = run_pipeline(cfg).metrics
    for model in ("dense", "dino_qpm"):
        for split in ("val", "test"):
            assert 0.0 < metrics[model][split]["sid_at_5"] <= 1.0
    assert metrics["dino_qpm"]["test"]["accuracy"] >= 0.75


def test_same_config_same_directory_other_config_its_own(tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides)
    a = run_pipeline(cfg, until="tokens", preset="tiny").run_dir
    assert a.name.startswith("tiny-") and a == run_dir_for(cfg, "tiny")
    assert run_pipeline(cfg, until="tokens", preset="tiny").run_dir == a
    other = load_config(ROOT / "configs" / "tiny.yaml", [*tiny_overrides, "dense.lr=1e-3"])
    assert run_dir_for(other, "tiny") != a
    # Where the run writes and caches is not part of what it computes.
    moved = load_config(ROOT / "configs" / "tiny.yaml", [f"cache.root={tmp_path / 'x'}",
                                                          f"runtime.output_dir={tmp_path / 'y'}"])
    assert config_hash(moved) == config_hash(cfg)


def test_deepspeed_json_is_hashed_by_content_not_path(tiny_overrides: list[str], tmp_path: Path) -> None:
    template = ROOT / "toolkit" / "train" / "ds_config.json"
    copy = tmp_path / "elsewhere" / "ds.json"
    copy.parent.mkdir()
    copy.write_text(template.read_text())
    base = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides)
    here, there = (replace(base, [f"runtime.deepspeed_config={p}"]) for p in (template, copy))
    assert config_hash(here) == config_hash(there)
    copy.write_text(template.read_text().replace('"gradient_clipping": 0.0', '"gradient_clipping": 1.0'))
    assert config_hash(here) != config_hash(there)


def test_deepspeed_default_is_the_shipped_template(tiny_overrides: list[str], tmp_path: Path) -> None:
    from toolkit.train._deepspeed import DEFAULT_TEMPLATE, deepspeed_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides)
    assert DEFAULT_TEMPLATE == ROOT / "toolkit" / "train" / "ds_config.json"
    template = json.loads(DEFAULT_TEMPLATE.read_text())
    out = deepspeed_config(cfg.dense, cfg.runtime, precision="fp32")
    assert {k: out[k] for k in template if k not in ("zero_optimization", "bf16")} == {
        k: v for k, v in template.items() if k not in ("zero_optimization", "bf16")}
    assert out["train_batch_size"] == cfg.dense.batch_size and out["zero_optimization"]["stage"] == 0
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({**template, "gradient_clipping": 1.0}))
    custom = replace(cfg, [f"runtime.deepspeed_config={own}"])
    assert deepspeed_config(custom.dense, custom.runtime, precision="fp32")["gradient_clipping"] == 1.0


def test_until_qp_names_the_new_stage_name(tiny_overrides: list[str]) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides)
    with pytest.raises(ValueError, match="--until qp is now --until select"):
        run_pipeline(cfg, until="qp")
    with pytest.raises(ValueError, match="must be one of tokens, dense, select, finetune, evaluate"):
        run_pipeline(cfg, until="everything")


def test_missing_data_fails_before_writing_anything(tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg = load_config(None, [*tiny_overrides, "data.dataset=fashion_mnist", f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_pipeline(cfg)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_run_whose_first_stage_fails_leaves_no_directory(tiny_overrides: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-weights.safetensors"
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [*tiny_overrides, f"backbone.weights={missing}", "backbone.depth=null", "backbone.embed_dim=null",
                       "backbone.num_heads=null"])
    with pytest.raises(FileNotFoundError, match="no-such-weights"):
        run_pipeline(cfg)
    assert not run_dir_for(cfg).exists()


def test_val_fraction_zero_holds_out_nothing_says_so_and_shares_the_token_stores(tiny_overrides: list[str]) -> None:
    held = run_pipeline(load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides), until="tokens")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*tiny_overrides, "data.val_fraction=0", "dense.epochs=1"])
    run = run_pipeline(cfg, until="dense")
    assert run.backbone_builds == 0  # the validation rows are rows of the same train store
    assert {s: run.stages[f"tokens_{s}"]["key"] for s in SPLITS} == \
        {s: held.stages[f"tokens_{s}"]["key"] for s in SPLITS}
    assert run.metrics["validation"]["held_out"] is False and run.metrics["validation"]["n_fit"] == 40
    assert run.metrics["dense"]["val"] is None and run.metrics["dense"]["test"]["accuracy"] is not None
    log = (run.run_dir / "log.txt").read_text()
    assert "nothing held out (data.val_fraction=0)" in log
    assert "accuracy (test; nothing held out for validation): linear_probe" in log


def test_live_mode_trains_on_the_fit_rows_and_scores_validation(tiny_overrides: list[str]) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*tiny_overrides, "cache.mode=live", "probe.epochs=1",
                                                        "dense.epochs=1", "finetune.epochs=1"])
    run = run_pipeline(cfg, until="finetune")
    assert run.metrics["validation"]["n_val"] == 8 and run.metrics["validation"]["n_fit"] == 32
    for model in ("linear_probe", "dense", "dino_qpm"):
        assert 0.0 <= run.metrics[model]["val"]["accuracy"] <= 1.0
    history = json.loads((Path(run.stages["finetune"]["directory"]) / "history.json").read_text())
    assert "val_accuracy" in history[-1]  # every epoch ends with the validation accuracy
