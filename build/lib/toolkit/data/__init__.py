"""Datasets, preprocessing and object masks.

`load_dataset(cfg, split)` returns a dataset whose items are `(PIL RGB image, label, bool (H, W) mask or None)`.
Images stay PIL until `make_transform` turns them into backbone input, so the same dataset feeds token caching,
live training and explanation rendering. Masks are only used by the Plausibility metric (docs/method.md#metrics);
`mask_to_grid` brings them onto the patch grid.

Datasets: Fashion-MNIST (Debian IDX files; exact silhouette masks), CUB-200-2011 (full images, segmentation masks),
Stanford Cars (no masks), ImageFolder (optional mask tree) and a synthetic set of coloured shapes for fast tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from toolkit.config import DataConfig
from toolkit.data.readers import (
    FASHION_MNIST_CLASSES,
    SyntheticDataset,
    read_cars,
    read_cub,
    read_fashion_mnist,
    read_imagefolder,
)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
SYNTHETIC_SIZE = 56  # px; a multiple of 14 so a DINOv2 ViT sees it at native resolution

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT", "ImageDataset", "balanced_subset", "describe",
           "load_dataset", "make_transform", "mask_to_grid"]


class ImageDataset(Protocol):
    """What every dataset returned by `load_dataset` provides.

    Attributes:
        classes: class names, index = label.
        variant: what exactly was read (e.g. "cub-full-images", "fashion-mnist-idx"); part of cache keys.
        ids: a stable identity per sample (relative path, "train:12345", ...); part of cache keys.
        labels: (N,) int64.
    """

    classes: list[str]
    variant: str
    ids: list[str]
    labels: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Image.Image, int, np.ndarray | None]: ...

    def subset(self, idx: Sequence[int]) -> ImageDataset: ...


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of a seeded draw of `per_class` samples from every class (all of a class if it has fewer).

    Args:
        labels: (N,) integer labels.
        per_class: samples to keep per class.
        seed: seed of the draw; the same seed and labels always give the same indices.

    Returns:
        (M,) int64 indices in increasing order, so the subset keeps the dataset's order.
    """
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def load_dataset(cfg: DataConfig, split: Literal["train", "test"]) -> ImageDataset:
    """Read `split` of the dataset named by `cfg.dataset`, then draw the seeded per-class subset if one is set.

    Args:
        cfg: the data config; `root` overrides the dataset's default location.
        split: "train" or "test" (Fashion-MNIST test = the t10k file; CUB/Cars = the official test split).

    Raises:
        FileNotFoundError: a metadata file or folder is missing (the message names it).
        ValueError: unknown split or dataset, or inconsistent metadata.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(cfg.root).expanduser() if cfg.root is not None else None

    def need_root() -> Path:
        if root is None:
            raise ValueError(f"data.root must be set for dataset {cfg.dataset!r}")
        return root

    ds: Any
    if cfg.dataset == "fashion_mnist":
        ds = read_fashion_mnist(root if root is not None else Path(FASHION_MNIST_ROOT), split)
    elif cfg.dataset == "cub":
        ds = read_cub(need_root(), split)
    elif cfg.dataset == "cars":
        ds = read_cars(need_root(), split)
    elif cfg.dataset == "imagefolder":
        ds = read_imagefolder(need_root(), split, Path(cfg.mask_root).expanduser() if cfg.mask_root else None)
    elif cfg.dataset == "synthetic":
        ds = SyntheticDataset(num_classes=cfg.num_classes, per_class=cfg.synthetic_size, seed=cfg.seed, split=split,
                              size=SYNTHETIC_SIZE)
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; one of fashion_mnist, cub, cars, imagefolder, synthetic")

    per_class = cfg.train_per_class if split == "train" else cfg.test_per_class
    if per_class is not None:
        # Different streams for the two splits, so train and test draws are independent for one seed.
        ds = ds.subset(balanced_subset(ds.labels, per_class, seed=cfg.seed * 2 + (split == "test")))
    return ds


class _MinMax:
    """Per-image global min-max rescale to [0, 1], then clip (the reference quirk, docs/method.md#model)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.min(), x.max()
        return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp_(0.0, 1.0)


def make_transform(*, image_size: int, mean: Sequence[float], std: Sequence[float],
                   reference_minmax: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> backbone input: square bicubic resize (no crop), ToTensor, Normalize [, min-max].

    Args:
        image_size: side S of the square output.
        mean, std: per-channel statistics, normally `Backbone.mean` / `Backbone.std` (timm data config).
        reference_minmax: apply the reference's per-image min-max rescale after Normalize (off by default).

    Returns:
        A picklable callable giving a float32 tensor (3, S, S).
    """
    steps: list[Callable] = [
        T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ]
    if reference_minmax:
        steps.append(_MinMax())
    return T.Compose(steps)


def mask_to_grid(mask: np.ndarray | None, grid: tuple[int, int]) -> np.ndarray:
    """Object mask at image resolution -> binary mask on the patch grid.

    Area-averages the mask onto the grid and keeps every cell with any object in it (> 0), mirroring the
    reference's cv2 INTER_AREA resize of the CUB segmentation followed by `> 0` (docs/method.md#metrics).

    Args:
        mask: bool or numeric (H, W); values > 0 are object. None means "no mask": an all-zero grid is returned
            (the reference's convention for Cars), so Plausibility must skip images whose grid is all zero.
        grid: (h, w) patch grid, e.g. `Backbone.grid(image_size)`.

    Returns:
        float32 (h, w) of 0.0 / 1.0.
    """
    h, w = grid
    if mask is None:
        return np.zeros((h, w), dtype=np.float32)
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    area = Image.fromarray((m > 0).astype(np.float32)).resize((w, h), Image.BOX)
    return (np.asarray(area) > 0).astype(np.float32)


def describe(ds: ImageDataset) -> dict[str, Any]:
    """Run metadata for a dataset: variant, size, classes, per-class counts and where it was read from."""
    root = getattr(ds, "root", None)
    return {
        "variant": ds.variant,
        "n": len(ds),
        "n_classes": len(ds.classes),
        "per_class": np.bincount(ds.labels, minlength=len(ds.classes)).tolist(),
        "root": str(root) if root is not None else None,
    }
