"""Token cache: one pass of the frozen backbone per split into memory-mapped fp16 arrays, keyed by content hash.

Layout of a store directory (an artefact of stage "tokens", see toolkit.artifacts):
    patch.npy  (N, P, D) float16   patch tokens of the last block after the final norm, registers dropped
    cls.npy    (N, D)    float16   CLS token
    labels.npy (N,)      int64
    masks.npy  (N, h, w) uint8     object masks on the patch grid (only for datasets with masks)
    cls_blocks.npy (N, n, D) float16  CLS token of each of the last n = min(4, depth) blocks after the final norm
                                      (oldest first; the last equals cls.npy), for the DINOv2-protocol probe
    patch_mean.npy (N, D) float32     average patch token of the last block (the probe's "avgpool" input)
    meta.json                      grid, classes, sample ids, dataset variant, backbone identity

The key hashes (backbone name, weights identity, image size, preprocessing, layer, dataset sample ids), so a
second run with the same inputs never builds the backbone, and any change rebuilds. `live` mode skips the cache
and runs the backbone inside the training loop (for augmentation and for checking the cache).

The validation split is rows of the train store (`split_rows`): a `StoreRows` view with the store's surface, so the
same extraction serves the fit and the validation rows, and the store's key does not depend on `data.val_fraction`.
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
from toolkit.data import Holdout, Preprocess, mask_to_grid, preprocess_for
from toolkit.distributed import local_world_size, usable_cores
from toolkit.model import Backbone, weights_identity

LAYER = "last-block+final-norm"  # which tokens are cached (docs/method.md#model: last block, use_norm=True)
CLS_BLOCKS = 4  # CLS tokens of this many last blocks are cached (DINOv2's linear evaluation uses n in {1, 4})


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

    @cached_property
    def cls_blocks(self) -> np.ndarray | None:
        """(N, n, D) CLS tokens of the last n blocks (None in stores written before they were cached)."""
        p = self.directory / "cls_blocks.npy"
        return np.load(p, mmap_mode="r") if p.is_file() else None

    @cached_property
    def patch_mean(self) -> np.ndarray | None:
        """(N, D) average patch token of the last block (None in stores written before it was cached)."""
        p = self.directory / "patch_mean.npy"
        return np.load(p) if p.is_file() else None

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])  # type: ignore[return-value]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def dataset(self, *, patch: bool = True) -> Dataset:
        """Batches of this store; `patch=False` leaves out the patch tokens (a linear probe reads CLS only)."""
        return TokenDataset(self, patch=patch)


@dataclass(frozen=True)
class StoreRows:
    """Some rows of a token store (the fit or validation rows of the train split) with the store's surface.

    Attributes:
        store: the whole split's store.
        rows: (n,) sorted row indices into it; sample i of the view is row rows[i] of the store.
        key: the view's own key (the store's key + which draw + which part), what stages hash as their input.
    """

    store: TokenStore
    rows: np.ndarray
    key: str

    @property
    def directory(self) -> Path:
        return self.store.directory

    @property
    def meta(self) -> dict[str, Any]:
        return self.store.meta

    @property
    def grid(self) -> tuple[int, int]:
        return self.store.grid

    @property
    def classes(self) -> list[str]:
        return self.store.classes

    @cached_property
    def labels(self) -> np.ndarray:
        return self.store.labels[self.rows]

    @cached_property
    def masks(self) -> np.ndarray | None:
        m = self.store.masks
        return None if m is None else m[self.rows]

    @cached_property
    def cls_blocks(self) -> np.ndarray | None:
        b = self.store.cls_blocks
        return None if b is None else np.asarray(b[self.rows])

    @cached_property
    def patch_mean(self) -> np.ndarray | None:
        p = self.store.patch_mean
        return None if p is None else p[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def dataset(self, *, patch: bool = True) -> Dataset:
        return TokenDataset(self.store, self.rows, patch=patch)


def split_rows(split: Any, rows: np.ndarray, part: str, tag: str) -> Any:
    """The rows `rows` of a cached (TokenStore) or live (LiveSplit) split, keyed `<split key>:<tag>:<part>`.

    Args:
        split: the whole train split.
        rows: (n,) sorted indices of its samples.
        part: "fit" or "val".
        tag: names the draw (`toolkit.data.Holdout.tag`), so another fraction or seed gives other keys.
    """
    key = f"{split.key}:{tag}:{part}"
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(split, LiveSplit):
        return split.rows(rows, key)
    return StoreRows(split, rows, key)


def holdout_views(train: Any, hold: Holdout) -> tuple[Any, Any | None]:
    """(fit rows, validation rows) of the train split; (train itself, None) when nothing is held out."""
    if not hold.held_out:
        return train, None
    return split_rows(train, hold.fit, "fit", hold.tag), split_rows(train, hold.val, "val", hold.tag)


class LiveSplit:
    """Live mode: the same surface as a TokenStore, but batches hold images and the loop runs the backbone."""

    def __init__(self, *, dataset: Any, backbone: Backbone, data: DataConfig, key: str) -> None:
        self.key = f"live-{key}"  # its own key: live tokens are fp32, cached ones fp16
        self.grid = backbone.grid(data.image_size)
        self.classes = list(dataset.classes)
        self.labels = np.asarray(dataset.labels, dtype=np.int64)
        self.masks = None  # metrics that need masks read them from a token cache
        pre = preprocess_for(data, backbone.mean, backbone.std)
        self.meta = {"grid": list(self.grid), "classes": self.classes, "ids": list(dataset.ids),
                     "variant": dataset.variant, "embed_dim": backbone.embed_dim, "backbone": backbone.name,
                     "weights": backbone.weights_hash, "mean": list(pre.mean), "std": list(pre.std),
                     "interpolation": pre.interpolation}
        self._images = ImageDataset(dataset, pre.transform(data.image_size), self.grid, data.mask_resize)

    def rows(self, rows: np.ndarray, key: str) -> LiveSplit:
        """The same split restricted to `rows` (the fit or validation rows of train), under `key`."""
        view = object.__new__(LiveSplit)
        view.__dict__.update(self.__dict__)
        view.key, view.labels = f"live-{key}", self.labels[rows]
        img = self._images
        view._images = ImageDataset(img.dataset.subset(rows), img.transform, img.grid, img.mask_resize)
        return view

    def __len__(self) -> int:
        return len(self._images)

    def dataset(self, *, patch: bool = True) -> Dataset:
        """The images; `patch` is accepted for the common surface (the loop's backbone makes every token)."""
        return self._images


class TokenDataset(Dataset):
    """Batches straight from the memory map: `__getitems__` reads a whole batch with one fancy index.

    With `rows`, sample i is row rows[i] of the store (a fit or validation view); "index" is always i. With
    `patch=False` batches hold no "patch": the patch tokens are 64x the CLS tokens on disk, and reading them for a
    model that reads CLS only cost the probe most of its time and, at 54,000 rows, left 4.6 GB of freed batches in
    the allocator's heap during evaluation."""

    def __init__(self, store: TokenStore, rows: np.ndarray | None = None, *, patch: bool = True) -> None:
        self.store = store
        self.rows = rows
        self.patch = patch

    def __len__(self) -> int:
        return len(self.store) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        local = np.asarray(indices, dtype=np.int64)
        idx = local if self.rows is None else self.rows[local]
        order = np.argsort(idx)  # sorted reads are sequential on disk; restore the sampler's order afterwards
        inv = np.argsort(order)
        cls = np.asarray(self.store.cls[idx[order]])[inv]
        out = {"cls": torch.from_numpy(cls).float(), "label": torch.from_numpy(self.store.labels[idx]),
               "index": torch.from_numpy(local)}
        if self.patch:
            out["patch"] = torch.from_numpy(np.asarray(self.store.patch[idx[order]])[inv]).float()
        if self.store.masks is not None:
            out["mask"] = torch.from_numpy(self.store.masks[idx].astype(np.float32))
        return out


class ImageDataset(Dataset):
    """Live mode: preprocessed images (the loop runs the backbone), with grid masks when the dataset has them."""

    def __init__(self, dataset: Any, transform: Callable[[Any], torch.Tensor], grid: tuple[int, int],
                 mask_resize: str = "box") -> None:
        self.dataset, self.transform, self.grid, self.mask_resize = dataset, transform, grid, mask_resize

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, label, mask = self.dataset[i]
        out = {"image": self.transform(image), "label": torch.tensor(label), "index": torch.tensor(i)}
        if mask is not None:
            out["mask"] = torch.from_numpy(mask_to_grid(mask, self.grid, self.mask_resize))  # type: ignore[arg-type]
        return out


def token_key(data: DataConfig, backbone: BackboneConfig, split: str, ids: list[str],
              seed: int) -> tuple[str, dict]:
    """Content key of a split's tokens and the config slice it hashes."""
    ids_hash = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    weights = weights_identity(backbone)
    if backbone.weights == "none":  # random init: the weights are a function of the seed and the architecture
        weights += f":seed={seed}:{backbone.arch_overrides()}"
    slice_ = {"backbone": backbone.name, "weights": weights, "image_size": data.image_size,
              "reference_minmax": data.minmax, "layer": LAYER, "split": split,
              "dataset": data.dataset, "ids_sha256": ids_hash, "n": len(ids),
              "arrays": f"cls_blocks{CLS_BLOCKS}+patch_mean"}
    # Only when they differ from the defaults, so the keys of default runs stay as they were.
    if data.preprocess != "timm":
        slice_["preprocess"] = data.preprocess
    if data.mask_resize != "box":
        slice_["mask_resize"] = data.mask_resize
    return content_key("tokens", slice_), slice_


def store_arrays(*, n: int, grid: tuple[int, int], dim: int, masks: bool,
                 cls_blocks: int = 1) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """The memory-mapped arrays of a store: file name -> (dtype, shape)."""
    out: dict[str, tuple[Any, tuple[int, ...]]] = {
        "patch.npy": (np.float16, (n, grid[0] * grid[1], dim)), "cls.npy": (np.float16, (n, dim)),
        "cls_blocks.npy": (np.float16, (n, cls_blocks, dim)), "patch_mean.npy": (np.float32, (n, dim))}
    if masks:
        out["masks.npy"] = (np.uint8, (n, *grid))
    return out


def store_bytes(*, n: int, grid: tuple[int, int], dim: int, masks: bool, cls_blocks: int = 1) -> int:
    """Bytes a store needs: images x tokens x width x 2 (patch.npy, fp16) plus the smaller arrays, labels and
    headers (a page per file for the headers, meta.json and manifest.json)."""
    arrays = store_arrays(n=n, grid=grid, dim=dim, masks=masks, cls_blocks=cls_blocks)
    data = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for dtype, shape in arrays.values())
    return data + 8 * n + 4096 * (len(arrays) + 3)


def allocate_store(out: Path, *, n: int, grid: tuple[int, int], dim: int, masks: bool, cls_blocks: int = 1) -> None:
    """Create the (zero-filled) memory maps of a store so that several processes can fill them.

    The files' blocks are reserved now (posix_fallocate): a full disk fails here with ENOSPC, not later as a SIGBUS
    of a write into a sparse memory map.
    """
    for name, (dtype, shape) in store_arrays(n=n, grid=grid, dim=dim, masks=masks, cls_blocks=cls_blocks).items():
        np.lib.format.open_memmap(out / name, mode="w+", dtype=dtype, shape=shape).flush()
        with open(out / name, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def loader_options(num_workers: int | str, pin_memory: bool, device: torch.device) -> dict[str, Any]:
    """DataLoader settings for image batches (decoding and resizing run in worker processes).

    Args:
        num_workers: runtime.num_workers; "auto" = 0 on CPU (the cores run the model), min(8, CPU cores per local
            rank) on CUDA, where decoding in the main process would starve the GPU.
        pin_memory: runtime.pin_memory; only takes effect on CUDA.
    """
    cuda = device.type == "cuda"
    if num_workers == "auto":
        num_workers = min(8, max(1, usable_cores() // local_world_size())) if cuda else 0
    workers = int(num_workers)
    out: dict[str, Any] = {"num_workers": workers, "pin_memory": bool(pin_memory and cuda)}
    if workers:
        out["persistent_workers"] = cuda  # keep the workers between epochs (one loader per stage, see fit)
        out["prefetch_factor"] = 4
    return out


def n_cls_blocks(backbone: Backbone) -> int:
    """How many last blocks' CLS tokens a store of this backbone holds: min(CLS_BLOCKS, depth)."""
    return min(CLS_BLOCKS, len(backbone.model.blocks))


def tokens_with_blocks(backbone: Backbone, images: torch.Tensor,
                       n_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`Backbone.tokens` plus the CLS token of each of the last `n_blocks` blocks, after the final norm.

    As DINOv2's `get_intermediate_layers(n, norm=True)`: the output of each block is passed through the
    backbone's final LayerNorm; the last block's is exactly the CLS that `tokens` returns.

    Returns:
        patch (B, P, D), cls (B, D), cls_blocks (B, n_blocks, D).
    """
    captured: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda _m, _i, out: captured.append(out[:, 0]))
             for blk in backbone.model.blocks[-n_blocks:]]
    try:
        patch, cls = backbone.tokens(images)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        blocks = backbone.model.norm(torch.stack(captured, 1))
    return patch, cls, blocks


def extract_tokens(backbone: Backbone, dataset: Any, out: Path, *, image_size: int, reference_minmax: bool,
                   batch_size: int, console: Console, desc: str, shard: tuple[int, int] = (0, 1),
                   options: dict[str, Any] | None = None, preprocess: Preprocess | None = None,
                   mask_resize: str = "box") -> int:
    """Run the frozen backbone over this process's share of `dataset` into the maps of `allocate_store`.

    `preprocess` (toolkit.data.preprocess_for) replaces the default (bicubic, backbone statistics,
    `reference_minmax`); `mask_resize` is `data.mask_resize`.

    With `shard=(rank, world)` only samples rank, rank + world, ... are encoded, so the ranks of a distributed
    run each do a share of one store.

    Returns:
        the number of images this process encoded.
    """
    grid = backbone.grid(image_size)
    if preprocess is None:
        preprocess = Preprocess("bicubic", tuple(backbone.mean), tuple(backbone.std), reference_minmax)
    transform = preprocess.transform(image_size)
    patch = np.load(out / "patch.npy", mmap_mode="r+")
    cls = np.load(out / "cls.npy", mmap_mode="r+")
    blocks = np.load(out / "cls_blocks.npy", mmap_mode="r+") if (out / "cls_blocks.npy").exists() else None
    pmean = np.load(out / "patch_mean.npy", mmap_mode="r+") if (out / "patch_mean.npy").exists() else None
    masks = np.load(out / "masks.npy", mmap_mode="r+") if (out / "masks.npy").exists() else None
    indices = list(range(shard[0], len(dataset), shard[1]))
    live = ImageDataset(dataset, transform, grid, mask_resize)
    opts = {k: v for k, v in (options or {}).items() if k != "persistent_workers"}  # one pass: nothing to keep
    loader = DataLoader(torch.utils.data.Subset(live, indices), batch_size=batch_size, shuffle=False, **opts)
    device = next(backbone.parameters()).device
    for batch in console.progress(loader, total=len(loader), desc=desc):
        images = batch["image"].to(device, non_blocking=True)
        if blocks is not None:
            tok, c, cb = tokens_with_blocks(backbone, images, blocks.shape[1])
        else:
            (tok, c), cb = backbone.tokens(images), None
        idx = batch["index"].numpy()
        patch[idx] = tok.float().cpu().numpy().astype(np.float16)
        cls[idx] = c.float().cpu().numpy().astype(np.float16)
        if blocks is not None and cb is not None:
            blocks[idx] = cb.float().cpu().numpy().astype(np.float16)
        if pmean is not None:
            pmean[idx] = tok.float().mean(1).cpu().numpy()
        if masks is not None:
            masks[idx] = batch["mask"].numpy().astype(np.uint8)
    for arr in (patch, cls, masks, blocks, pmean):
        if arr is not None:
            arr.flush()
    return len(indices)
