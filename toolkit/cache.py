"""Token cache: one pass of the frozen backbone per split into memory-mapped fp16 arrays, keyed by content hash.

Layout of a store directory (an artefact of stage "tokens", see toolkit.artifacts):
    patch.npy  (N, P, D) float16   patch tokens of the last block after the final norm, registers dropped
    cls.npy    (N, D)    float16   CLS token
    labels.npy (N,)      int64
    masks.npy  (N, h, w) uint8     object masks on the patch grid (only for datasets with masks)
    meta.json                      grid, classes, sample ids, dataset variant, backbone identity

The key hashes (backbone name, weights identity, image size, preprocessing, layer, dataset sample ids), so a
second run with the same inputs never builds the backbone, and any change rebuilds. `live` mode skips the cache
and runs the backbone inside the training loop (for augmentation and for checking the cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from toolkit.artifacts import check_artifact, content_key
from toolkit.config import BackboneConfig, DataConfig
from toolkit.console import Console
from toolkit.data import make_transform, mask_to_grid
from toolkit.model import Backbone, weights_identity

LAYER = "last-block+final-norm"  # which tokens are cached (docs/method.md#model: last block, use_norm=True)


class DamagedStoreError(OSError):
    """A token-store file does not hold what its header or manifest promises (truncated copy, full disk)."""


@dataclass(frozen=True)
class TokenStore:
    """Read-only view of one cached split."""

    directory: Path
    key: str

    def __post_init__(self) -> None:
        # Stores are opened straight from run directories too (evaluation, explanations), not only through
        # get_or_run: a damaged one stops here with its path and the fix, not deep inside numpy.
        check_artifact(self.directory)

    @cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.directory / "meta.json").read_text())

    def _load(self, name: str, mmap: bool) -> np.ndarray:
        """One array of the store; a damaged file (cut short, bad header) stops with its path and the fix."""
        path = self.directory / name
        try:
            return np.load(path, mmap_mode="r" if mmap else None)
        except (ValueError, OSError, EOFError) as e:
            raise DamagedStoreError(f"token store file {path} is damaged ({e}); delete {self.directory} and rerun "
                                    "launch/train.py with the same config to rebuild it") from e

    @cached_property
    def patch(self) -> np.ndarray:
        return self._load("patch.npy", mmap=True)

    @cached_property
    def cls(self) -> np.ndarray:
        return self._load("cls.npy", mmap=True)

    @cached_property
    def labels(self) -> np.ndarray:
        return self._load("labels.npy", mmap=False)

    @cached_property
    def masks(self) -> np.ndarray | None:
        return self._load("masks.npy", mmap=False) if (self.directory / "masks.npy").is_file() else None

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])  # type: ignore[return-value]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def dataset(self) -> Dataset:
        return TokenDataset(self)


class LiveSplit:
    """Live mode: the same surface as a TokenStore, but batches hold images and the loop runs the backbone."""

    def __init__(self, *, dataset: Any, backbone: Backbone, data: DataConfig, key: str) -> None:
        self.key = f"live-{key}"  # its own key: live tokens are fp32, cached ones fp16
        self.grid = backbone.grid(data.image_size)
        self.classes = list(dataset.classes)
        self.labels = np.asarray(dataset.labels, dtype=np.int64)
        self.masks = None  # metrics that need masks read them from a token cache
        self.meta = {"grid": list(self.grid), "classes": self.classes, "ids": list(dataset.ids),
                     "variant": dataset.variant, "embed_dim": backbone.embed_dim, "backbone": backbone.name,
                     "weights": backbone.weights_hash, "mean": list(backbone.mean), "std": list(backbone.std)}
        transform = make_transform(image_size=data.image_size, mean=backbone.mean, std=backbone.std,
                                   reference_minmax=data.reference_minmax)
        self._images = ImageDataset(dataset, transform, self.grid)

    def __len__(self) -> int:
        return len(self._images)

    def dataset(self) -> Dataset:
        return self._images


class TokenDataset(Dataset):
    """Batches straight from the memory map: `__getitems__` reads a whole batch with one fancy index."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices)
        order = np.argsort(idx)  # sorted reads are sequential on disk; restore the sampler's order afterwards
        inv = np.argsort(order)
        patch = np.asarray(self.store.patch[idx[order]])[inv]
        cls = np.asarray(self.store.cls[idx[order]])[inv]
        out = {"patch": torch.from_numpy(patch).float(), "cls": torch.from_numpy(cls).float(),
               "label": torch.from_numpy(self.store.labels[idx]), "index": torch.from_numpy(idx)}
        if self.store.masks is not None:
            out["mask"] = torch.from_numpy(self.store.masks[idx].astype(np.float32))
        return out


class ImageDataset(Dataset):
    """Live mode: preprocessed images (the loop runs the backbone), with grid masks when the dataset has them."""

    def __init__(self, dataset: Any, transform: Callable[[Any], torch.Tensor], grid: tuple[int, int]) -> None:
        self.dataset, self.transform, self.grid = dataset, transform, grid

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, label, mask = self.dataset[i]
        out = {"image": self.transform(image), "label": torch.tensor(label), "index": torch.tensor(i)}
        if mask is not None:
            out["mask"] = torch.from_numpy(mask_to_grid(mask, self.grid))
        return out


def token_key(data: DataConfig, backbone: BackboneConfig, split: str, ids: list[str],
              seed: int) -> tuple[str, dict]:
    """Content key of a split's tokens and the config slice it hashes."""
    ids_hash = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    weights = weights_identity(backbone)
    if backbone.weights == "none":  # random init: the weights are a function of the seed and the architecture
        weights += f":seed={seed}:{backbone.arch_overrides()}"
    slice_ = {"backbone": backbone.name, "weights": weights, "image_size": data.image_size,
              "reference_minmax": data.reference_minmax, "layer": LAYER, "split": split,
              "dataset": data.dataset, "ids_sha256": ids_hash, "n": len(ids)}
    return content_key("tokens", slice_), slice_


def allocate_store(out: Path, *, n: int, grid: tuple[int, int], dim: int, masks: bool) -> None:
    """Create the (zero-filled) memory maps of a store so that several processes can fill them."""
    p = grid[0] * grid[1]
    np.lib.format.open_memmap(out / "patch.npy", mode="w+", dtype=np.float16, shape=(n, p, dim)).flush()
    np.lib.format.open_memmap(out / "cls.npy", mode="w+", dtype=np.float16, shape=(n, dim)).flush()
    if masks:
        np.lib.format.open_memmap(out / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, *grid)).flush()


def loader_options(num_workers: int | str, pin_memory: bool, device: torch.device) -> dict[str, Any]:
    """DataLoader settings for image batches (decoding and resizing run in worker processes).

    Args:
        num_workers: runtime.num_workers; "auto" = 0 on CPU (the cores run the model), min(8, CPU cores per local
            rank) on CUDA, where decoding in the main process would starve the GPU.
        pin_memory: runtime.pin_memory; only takes effect on CUDA.
    """
    cuda = device.type == "cuda"
    if num_workers == "auto":
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        num_workers = min(8, max(1, (os.cpu_count() or 1) // local)) if cuda else 0
    workers = int(num_workers)
    out: dict[str, Any] = {"num_workers": workers, "pin_memory": bool(pin_memory and cuda)}
    if workers:
        out["persistent_workers"] = cuda  # keep the workers between epochs (one loader per stage, see fit)
        out["prefetch_factor"] = 4
    return out


def extract_tokens(backbone: Backbone, dataset: Any, out: Path, *, image_size: int, reference_minmax: bool,
                   batch_size: int, console: Console, desc: str, shard: tuple[int, int] = (0, 1),
                   options: dict[str, Any] | None = None) -> int:
    """Run the frozen backbone over this process's share of `dataset` into the maps of `allocate_store`.

    With `shard=(rank, world)` only samples rank, rank + world, ... are encoded, so the ranks of a distributed
    run each do a share of one store.

    Returns:
        the number of images this process encoded.
    """
    grid = backbone.grid(image_size)
    transform = make_transform(image_size=image_size, mean=backbone.mean, std=backbone.std,
                               reference_minmax=reference_minmax)
    patch = np.load(out / "patch.npy", mmap_mode="r+")
    cls = np.load(out / "cls.npy", mmap_mode="r+")
    masks = np.load(out / "masks.npy", mmap_mode="r+") if (out / "masks.npy").exists() else None
    indices = list(range(shard[0], len(dataset), shard[1]))
    live = ImageDataset(dataset, transform, grid)
    opts = {k: v for k, v in (options or {}).items() if k != "persistent_workers"}  # one pass: nothing to keep
    loader = DataLoader(torch.utils.data.Subset(live, indices), batch_size=batch_size, shuffle=False, **opts)
    device = next(backbone.parameters()).device
    for batch in console.progress(loader, total=len(loader), desc=desc):
        tok, c = backbone.tokens(batch["image"].to(device, non_blocking=True))
        idx = batch["index"].numpy()
        patch[idx] = tok.float().cpu().numpy().astype(np.float16)
        cls[idx] = c.float().cpu().numpy().astype(np.float16)
        if masks is not None:
            masks[idx] = batch["mask"].numpy().astype(np.uint8)
    for arr in (patch, cls, masks):
        if arr is not None:
            arr.flush()
    return len(indices)
