"""Reading a finished run directory: its resolved config, the stage directories its manifest names, and the
token stores it was trained on (with its validation split, drawn again from the config: the same rows the stages
used). Used by evaluation, explanations and export."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.cache import StoreRows, TokenStore, holdout_views
from toolkit.config import RunConfig, load_config
from toolkit.data import SPLITS, Holdout, holdout


@dataclass(frozen=True)
class Run:
    """What `evaluate_run` reads from a run directory."""

    directory: Path
    cfg: RunConfig
    stages: dict[str, Any]
    train: TokenStore
    test: TokenStore
    hold: Holdout  # the validation split: which train rows were held out
    fit: TokenStore | StoreRows  # the train rows the stages trained on (train itself when nothing was held out)
    val: StoreRows | None  # the validation rows (None when data.val_fraction=0)

    def stage_dir(self, name: str) -> Path:
        return _stage_dir(self.directory, self.stages, name)


def _stage_dir(run_dir: Path, stages: dict[str, Any], name: str) -> Path:
    if name not in stages:
        raise FileNotFoundError(f"{run_dir / 'manifest.json'} has no stage {name!r}: run the pipeline to the end "
                                "first")
    return Path(stages[name]["directory"])


def load_run(run_dir: Path) -> Run:
    """Config, manifest and token stores of a run; clear errors when something is missing."""
    for name in ("config.yaml", "manifest.json", "metrics.json", "checkpoint"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name} is missing: pass a run directory of a completed pipeline run")
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    stores = {}
    for split in SPLITS:
        d = _stage_dir(run_dir, stages, f"tokens_{split}")
        if not (d / "meta.json").is_file():
            raise FileNotFoundError(f"token cache {d} is gone; rerun the pipeline to rebuild it")
        stores[split] = TokenStore(d, stages[f"tokens_{split}"]["key"])
    cfg = load_config(run_dir / "config.yaml")
    hold = holdout(stores["train"].labels, cfg.data.val_fraction, cfg.data.seed)
    fit, val = holdout_views(stores["train"], hold)
    return Run(run_dir, cfg, stages, stores["train"], stores["test"], hold, fit, val)
