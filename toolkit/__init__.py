"""DINO-QPM toolkit: globally interpretable image classification on frozen DINOv2 backbones.

Public API (imported lazily so `import toolkit` stays cheap):
    load_config, RunConfig, ConfigError  - typed configuration (toolkit.config)
    create_backbone                      - frozen timm DINOv2 (toolkit.backbone)
    DinoQPM, SparseHead, DenseHead       - the model surface (toolkit.model)
    solve_qp, Selection                  - the QPM selection / assignment (toolkit.qp)
    run_pipeline                         - every stage, content-hashed (toolkit.pipeline)
    load_checkpoint                      - a self-contained trained model (toolkit.checkpoint)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_config": "toolkit.config",
    "RunConfig": "toolkit.config",
    "ConfigError": "toolkit.config",
    "create_backbone": "toolkit.backbone",
    "DinoQPM": "toolkit.model",
    "SparseHead": "toolkit.model",
    "DenseHead": "toolkit.model",
    "solve_qp": "toolkit.qp",
    "Selection": "toolkit.qp",
    "run_pipeline": "toolkit.pipeline",
    "load_checkpoint": "toolkit.checkpoint",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
