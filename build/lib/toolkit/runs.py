"""Reading a finished run directory: its resolved config, the stage directories its manifest names, and the
token stores it was trained on. Used by evaluation, explanations and export."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.cache import TokenStore
from toolkit.config import RunConfig, load_config


@dataclass(frozen=True)
class Run:
    """What `evaluate_run` reads from a run directory."""

    directory: Path
    cfg: RunConfig
    stages: dict[str, Any]
    train: TokenStore
    test: TokenStore

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
    for split in ("train", "test"):
        d = _stage_dir(run_dir, stages, f"tokens_{split}")
        if not (d / "meta.json").is_file():
            raise FileNotFoundError(f"token cache {d} is gone; rerun the pipeline to rebuild it")
        stores[split] = TokenStore(d, stages[f"tokens_{split}"]["key"])
    return Run(run_dir, load_config(run_dir / "config.yaml"), stages, stores["train"], stores["test"])
