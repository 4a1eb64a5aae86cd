"""Stage `probe`: a linear classifier on the frozen CLS token of the same token cache, the baseline every run
reports (the paper compares DINO-QPM against a linear probe; docs/method.md#baselines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.artifacts import content_key, get_or_run
from toolkit.config import ProbeConfig, to_dict
from toolkit.distributed import dist_info, seed_everything
from toolkit.files import write_json
from toolkit.model import LinearProbe, save_checkpoint
from toolkit.train import Split, TrainContext, drop_work_dir, scores, split_keys, train_model, work_dir


def run_probe(*, train: Split, val: Split | None, test: Split, cfg: ProbeConfig, ctx: TrainContext, root: Path,
              meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Train the linear probe on the frozen CLS token of the fit rows; returns (directory, metrics: val_accuracy
    (None when nothing is held out), test_accuracy, train_accuracy)."""
    upstream = split_keys(train, val, test)
    key = content_key("probe", {"probe": to_dict(cfg), "seed": ctx.seed}, upstream)

    def build(tmp: Path) -> dict[str, Any]:
        seed_everything(ctx.seed)
        d = train.meta["embed_dim"]
        model = LinearProbe(in_dim=d, n_classes=len(train.classes), dropout=cfg.dropout)
        history = train_model(model, train, cfg, ctx, name="probe", work=work_dir(root, "probe", key), val=val)
        acc = scores(model, val, test, ctx)
        if not dist_info().is_main:
            return {}
        save_checkpoint(tmp / "checkpoint", model, kind="probe", adapter=None, embed_dim=d,
                        n_classes=len(train.classes), grid=train.grid, meta=meta)
        write_json(tmp / "history.json", history)
        return {**acc, "train_accuracy": history[-1]["train_accuracy"] if history else 0.0}

    directory, manifest, _ = get_or_run(root, "probe", key, build, config={"probe": to_dict(cfg)},
                                        upstream=upstream, log=ctx.console.log)
    drop_work_dir(root, "probe", key)
    return directory, manifest.metrics
