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
from toolkit.train import Split, TrainContext, drop_work_dir, evaluate, train_model, work_dir


def run_probe(*, train: Split, test: Split, cfg: ProbeConfig, ctx: TrainContext, root: Path,
              meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Train the linear probe on the frozen CLS token of the same cache; returns (directory, metrics)."""
    key = content_key("probe", {"probe": to_dict(cfg), "seed": ctx.seed}, {"train": train.key, "test": test.key})

    def build(tmp: Path) -> dict[str, Any]:
        seed_everything(ctx.seed)
        d = train.meta["embed_dim"]
        model = LinearProbe(in_dim=d, n_classes=len(train.classes), dropout=cfg.dropout)
        history = train_model(model, train, cfg, ctx, name="probe", work=work_dir(root, "probe", key))
        te = evaluate(model.to(ctx.device), test.dataset(), batch_size=ctx.eval_batch_size, device=ctx.device,
                      backbone=ctx.backbone)
        if not dist_info().is_main:
            return {}
        save_checkpoint(tmp / "checkpoint", model, kind="probe", adapter=None, embed_dim=d,
                        n_classes=len(train.classes), grid=train.grid, meta=meta)
        write_json(tmp / "history.json", history)
        return {"accuracy": te.accuracy, "train_accuracy": history[-1]["train_accuracy"] if history else 0.0}

    directory, manifest, _ = get_or_run(root, "probe", key, build, config={"probe": to_dict(cfg)},
                                        upstream={"train": train.key, "test": test.key}, log=ctx.console.log)
    drop_work_dir(root, "probe", key)
    return directory, manifest.metrics
