"""Datasets, preprocessing and object masks.

`load_dataset(cfg, split)` returns a dataset whose items are `(PIL RGB image, label, bool (H, W) mask or None)`.
Images stay PIL until `make_transform` turns them into backbone input, so the same dataset feeds token caching,
live training and explanation rendering. Masks are only used by the Plausibility metric (docs/method.md#metrics);
`mask_to_grid` brings them onto the patch grid.

Datasets: Fashion-MNIST (Debian IDX files; exact silhouette masks), CUB-200-2011 (full images, segmentation masks),
Stanford Cars (no masks), ImageFolder (optional mask tree) and a synthetic set of coloured shapes for fast tests.
The stored splits (`SPLITS`: train, test) and the validation split carved from train (`holdout`) are in
`toolkit.data.splits`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    read_cub_class_attributes,
    read_fashion_mnist,
    read_imagefolder,
)
from toolkit.data.splits import EVAL_SPLITS, SPLITS, Holdout, holdout, stratified_holdout

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
SYNTHETIC_SIZE = 56  # px; a multiple of 14 so a DINOv2 ViT sees it at native resolution

# Per-channel statistics the reference code normalises with (RobertZimm/DINO-QPM, dataset parameters), before its
# per-image min-max; datasets it has none for keep the backbone's (ImageNet) statistics.
REFERENCE_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cub": ((0.4853, 0.4964, 0.4295), (0.2300, 0.2258, 0.2625)),
    "cars": ((0.4593, 0.4466, 0.4453), (0.2920, 0.2910, 0.2988)),
}

__all__ = ["EVAL_SPLITS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT", "REFERENCE_STATS", "SPLITS", "Holdout",
           "ImageDataset", "Preprocess", "balanced_subset", "describe", "holdout", "load_dataset", "make_transform",
           "mask_to_grid", "preprocess_for", "read_cub_class_attributes", "stratified_holdout"]


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
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
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
                   reference_minmax: bool = False,
                   interpolation: Literal["bicubic", "bilinear"] = "bicubic") -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> backbone input: square resize (no crop), ToTensor, Normalize [, min-max].

    Args:
        image_size: side S of the square output.
        mean, std: per-channel statistics, normally `Backbone.mean` / `Backbone.std` (timm data config).
        reference_minmax: apply the reference's per-image min-max rescale after Normalize (off by default).
        interpolation: bicubic (timm's DINOv2 data config) or bilinear (torchvision's default, the reference's);
            PIL images are resized by PIL, which filters over the whole source footprint when shrinking.

    Returns:
        A picklable callable giving a float32 tensor (3, S, S).
    """
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    steps: list[Callable] = [
        T.Resize((image_size, image_size), interpolation=mode, antialias=True),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ]
    if reference_minmax:
        steps.append(_MinMax())
    return T.Compose(steps)


@dataclass(frozen=True)
class Preprocess:
    """How images become backbone input: resize filter, normalisation statistics, per-image min-max."""

    interpolation: Literal["bicubic", "bilinear"]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    minmax: bool

    def transform(self, image_size: int) -> Callable[[Image.Image], torch.Tensor]:
        return make_transform(image_size=image_size, mean=self.mean, std=self.std, reference_minmax=self.minmax,
                              interpolation=self.interpolation)


def preprocess_for(cfg: DataConfig, mean: Sequence[float], std: Sequence[float]) -> Preprocess:
    """The preprocessing `cfg.preprocess` asks for, given the backbone's own statistics.

    timm: bicubic resize, the backbone's mean/std, min-max only with `data.reference_minmax`. reference: what
    RobertZimm/DINO-QPM does: bilinear `Resize((S, S))`, ToTensor, Normalize with the dataset's statistics
    (`REFERENCE_STATS`; the backbone's for datasets it has none for), then per-image min-max to [0, 1] and clip.
    """
    if cfg.preprocess == "reference":
        m, s = REFERENCE_STATS.get(cfg.dataset, (tuple(mean), tuple(std)))
        return Preprocess("bilinear", tuple(float(v) for v in m), tuple(float(v) for v in s), True)
    return Preprocess("bicubic", tuple(float(v) for v in mean), tuple(float(v) for v in std), cfg.minmax)


def _cv2_linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for OpenCV's INTER_LINEAR resize along one axis (no antialias).

    Output pixel o samples the source at (o + 0.5) * n_in / n_out - 0.5 (half-pixel centres), clamped to the
    first and last source pixel, as `cv2.resize` does.
    """
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    low = i0 < 0
    i0[low], frac[low] = 0, 0.0
    high = i0 >= n_in - 1
    i0[high], frac[high] = n_in - 1, 0.0
    return i0, np.minimum(i0 + 1, n_in - 1), frac


def _bilinear_resize(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W) float -> (h, w) with OpenCV INTER_LINEAR semantics (each output reads at most 2 x 2 inputs)."""
    r0, r1, fr = _cv2_linear_taps(m.shape[0], h)
    c0, c1, fc = _cv2_linear_taps(m.shape[1], w)
    rows = m[r0] * (1 - fr)[:, None] + m[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc)[None, :] + rows[:, c1] * fc[None, :]


def mask_to_grid(mask: np.ndarray | None, grid: tuple[int, int],
                 mode: Literal["box", "bilinear"] = "box") -> np.ndarray:
    """Object mask at image resolution -> binary mask on the patch grid.

    box: area-averages the mask onto the grid and keeps every cell with any object in it (> 0).
    bilinear: the reference's `cv2.resize(mask, (w, h))` (INTER_LINEAR, which samples 2 x 2 source pixels
    around each cell centre instead of the whole cell) followed by `> 0`; it marks fewer cells at the object's
    border (docs/method.md#metrics).

    Args:
        mask: bool or numeric (H, W); values > 0 are object. None means "no mask": an all-zero grid is returned
            (the reference's convention for Cars), so Plausibility must skip images whose grid is all zero.
        grid: (h, w) patch grid, e.g. `Backbone.grid(image_size)`.
        mode: "box" or "bilinear".

    Returns:
        float32 (h, w) of 0.0 / 1.0.
    """
    h, w = grid
    if mask is None:
        return np.zeros((h, w), dtype=np.float32)
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    if mode == "bilinear":
        return (_bilinear_resize((m > 0).astype(np.float64), h, w) > 0).astype(np.float32)
    if mode != "box":
        raise ValueError(f"mask resize mode must be 'box' or 'bilinear', got {mode!r}")
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
