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
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from toolkit.artifacts import content_key, get_or_run
from toolkit.backbone import Backbone, weights_identity
from toolkit.config import BackboneConfig, CacheConfig, DataConfig
from toolkit.data import make_transform, mask_to_grid
from toolkit.runtime import Console

LAYER = "last-block+final-norm"  # which tokens are cached (dino_qpm.md §1.3: last block, use_norm=True)


@dataclass(frozen=True)
class TokenStore:
    """Read-only view of one cached split."""

    directory: Path
    key: str

    @cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.directory / "meta.json").read_text())

    @cached_property
    def patch(self) -> np.ndarray:
        return np.load(self.directory / "patch.npy", mmap_mode="r")

    @cached_property
    def cls(self) -> np.ndarray:
        return np.load(self.directory / "cls.npy", mmap_mode="r")

    @cached_property
    def labels(self) -> np.ndarray:
        return np.load(self.directory / "labels.npy")

    @cached_property
    def masks(self) -> np.ndarray | None:
        p = self.directory / "masks.npy"
        return np.load(p) if p.is_file() else None

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])  # type: ignore[return-value]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


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


def token_key(data: DataConfig, backbone: BackboneConfig, split: str, ids: list[str]) -> tuple[str, dict]:
    """Content key of a split's tokens and the config slice it hashes."""
    ids_hash = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    slice_ = {"backbone": backbone.name, "weights": weights_identity(backbone), "image_size": data.image_size,
              "reference_minmax": data.reference_minmax, "layer": LAYER, "split": split,
              "dataset": data.dataset, "ids_sha256": ids_hash, "n": len(ids)}
    return content_key("tokens", slice_), slice_


def extract_tokens(backbone: Backbone, dataset: Any, out: Path, *, image_size: int, reference_minmax: bool,
                   batch_size: int, console: Console, shard: tuple[int, int] = (0, 1)) -> int:
    """Run the frozen backbone over `dataset` and fill the memory maps in `out` (created if missing).

    With `shard=(rank, world)` only every world-th sample starting at rank is processed, so several processes can
    fill one store (the maps must exist already for rank > 0).

    Returns:
        the number of images this process encoded.
    """
    grid = backbone.grid(image_size)
    n, d, p = len(dataset), backbone.embed_dim, grid[0] * grid[1]
    transform = make_transform(image_size=image_size, mean=backbone.mean, std=backbone.std,
                               reference_minmax=reference_minmax)
    mode = "w+" if not (out / "patch.npy").exists() else "r+"
    patch = np.lib.format.open_memmap(out / "patch.npy", mode=mode, dtype=np.float16, shape=(n, p, d))
    cls = np.lib.format.open_memmap(out / "cls.npy", mode=mode, dtype=np.float16, shape=(n, d))
    has_masks = n > 0 and dataset[0][2] is not None
    masks = (np.lib.format.open_memmap(out / "masks.npy", mode=mode, dtype=np.uint8, shape=(n, *grid))
             if has_masks else None)
    indices = list(range(shard[0], n, shard[1]))
    live = ImageDataset(dataset, transform, grid)
    loader = DataLoader(torch.utils.data.Subset(live, indices), batch_size=batch_size, shuffle=False)
    device = next(backbone.parameters()).device
    for batch in console.progress(loader, total=len(loader), desc=f"backbone tokens -> {out.name}"):
        tok, c = backbone.tokens(batch["image"].to(device))
        idx = batch["index"].numpy()
        patch[idx] = tok.float().cpu().numpy().astype(np.float16)
        cls[idx] = c.float().cpu().numpy().astype(np.float16)
        if masks is not None:
            masks[idx] = batch["mask"].numpy().astype(np.uint8)
    for arr in (patch, cls, masks):
        if arr is not None:
            arr.flush()
    return len(indices)


def build_tokens(data: DataConfig, backbone_cfg: BackboneConfig, cache: CacheConfig, split: str, dataset: Any,
                 *, get_backbone: Callable[[], Backbone], console: Console) -> TokenStore:
    """The cached tokens of one split; `get_backbone` is called only when the store has to be built."""
    key, slice_ = token_key(data, backbone_cfg, split, list(dataset.ids))

    def build(tmp: Path) -> dict[str, Any]:
        backbone = get_backbone()
        grid = backbone.grid(data.image_size)
        n = extract_tokens(backbone, dataset, tmp, image_size=data.image_size,
                           reference_minmax=data.reference_minmax, batch_size=backbone_cfg.batch_size,
                           console=console)
        np.save(tmp / "labels.npy", np.asarray(dataset.labels, dtype=np.int64))
        meta = {"grid": list(grid), "classes": list(dataset.classes), "ids": list(dataset.ids),
                "variant": dataset.variant, "embed_dim": backbone.embed_dim, "backbone": backbone.name,
                "weights": backbone.weights_hash, "mean": list(backbone.mean), "std": list(backbone.std)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        return {"images": n}

    directory, _, _ = get_or_run(Path(cache.root), "tokens", key, build, config=slice_, log=console.log)
    return TokenStore(directory, key)
