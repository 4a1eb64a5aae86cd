"""DINO-QPM toolkit: globally interpretable image classification on frozen DINOv2 backbones.

Packages, from the foundation up (a module imports only from the ones above it; tests/test_layering.py checks):
    config, files, distributed, console, artifacts   typed config, atomic writes, process state, logs, cached artefacts
    data/       dataset readers, transforms, object masks
    model/      frozen timm backbone and weight conversion, token-wise adapter, heads, DinoQPM, checkpoints
    cache       the token store (one backbone pass per split, memory-mapped)
    train/      engines (torch, DeepSpeed), the loop, losses, `train_model`
    qp/         the QPM discrete problem: inputs A and R, heuristic, bounds, exact model, certificate, CLI
    metrics/    interpretability metrics as pure functions
    explain/    local, global and contrast views, the run report, the explain CLI
    runs        reading a finished run directory
    stages/     tokens, probe, probe_dinov2, dense, select (QP), finetune, evaluate: artefacts in, artefact out
    pipeline    chains the stages and writes the run directory

Public API (imported lazily so `import toolkit` stays cheap):
    load_config, RunConfig, ConfigError  - typed configuration (toolkit.config)
    create_backbone                      - frozen timm DINOv2 (toolkit.model)
    DinoQPM, SparseHead, DenseHead       - the model surface (toolkit.model)
    load_checkpoint                      - a self-contained trained model (toolkit.model)
    solve_qp, Selection                  - the QPM selection / assignment (toolkit.qp)
    run_pipeline                         - every stage, content-hashed (toolkit.pipeline)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_API = {
    "load_config": "toolkit.config",
    "RunConfig": "toolkit.config",
    "ConfigError": "toolkit.config",
    "create_backbone": "toolkit.model",
    "DinoQPM": "toolkit.model",
    "SparseHead": "toolkit.model",
    "DenseHead": "toolkit.model",
    "load_checkpoint": "toolkit.model",
    "solve_qp": "toolkit.qp",
    "Selection": "toolkit.qp",
    "run_pipeline": "toolkit.pipeline",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
