"""Stage `tokens`: one pass of the frozen backbone per split into the token cache (or a live split).

The store is built only on a cache miss, sharded over the ranks of a distributed run, and `get_backbone` is called
only then, so a rerun with the same data and backbone never constructs the backbone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.artifacts import get_or_run
from toolkit.cache import (
    LiveSplit,
    TokenStore,
    allocate_store,
    extract_tokens,
    n_cls_blocks,
    store_bytes,
    token_key,
)
from toolkit.config import BackboneConfig, CacheConfig, DataConfig
from toolkit.console import Console
from toolkit.data import preprocess_for
from toolkit.distributed import barrier, broadcast_object, dist_info
from toolkit.files import DiskFullError, free_bytes, human_bytes
from toolkit.model import Backbone


def live_split(data: DataConfig, backbone_cfg: BackboneConfig, split: str, dataset: Any, *, seed: int,
               backbone: Backbone) -> LiveSplit:
    """A split served live (cache.mode=live): nothing is written, the backbone runs in the training loop."""
    key, _ = token_key(data, backbone_cfg, split, list(dataset.ids), seed)
    return LiveSplit(dataset=dataset, backbone=backbone, data=data, key=key)


def build_tokens(data: DataConfig, backbone_cfg: BackboneConfig, cache: CacheConfig, split: str, dataset: Any,
                 *, seed: int, get_backbone: Callable[[], Backbone], console: Console,
                 loader_options: dict[str, Any] | None = None) -> TokenStore:
    """The cached tokens of one split; `get_backbone` is called only when the store has to be built.

    `loader_options` (see `toolkit.cache.loader_options`) put image decoding into DataLoader workers."""
    key, slice_ = token_key(data, backbone_cfg, split, list(dataset.ids), seed)

    def build(tmp: Path) -> dict[str, Any]:
        info = dist_info()
        backbone = get_backbone()
        grid = backbone.grid(data.image_size)
        short = None
        if info.is_main:
            has_masks = len(dataset) > 0 and dataset[0][2] is not None
            shape = {"n": len(dataset), "grid": grid, "dim": backbone.embed_dim, "masks": has_masks,
                     "cls_blocks": n_cls_blocks(backbone)}
            need, free = store_bytes(**shape), free_bytes(tmp)
            if need > free:  # before the backbone's pass, not after it
                short = (f"the token store of the {split} split needs {human_bytes(need)} ({len(dataset)} images x "
                         f"{grid[0] * grid[1]} tokens x {backbone.embed_dim} width x 2 bytes, plus the CLS arrays), "
                         f"but {tmp.parent} has {human_bytes(free)} free. Free space there, or point cache.root at a "
                         "bigger disk, or use cache.mode=live (no store is written), then rerun: nothing was kept")
            else:
                allocate_store(tmp, **shape)
        short = broadcast_object(short)  # every rank stops, none waits in the barrier below
        if short is not None:
            raise DiskFullError(short)
        pre = preprocess_for(data, backbone.mean, backbone.std)
        barrier()
        t0 = time.perf_counter()
        n = extract_tokens(backbone, dataset, tmp, image_size=data.image_size,
                           reference_minmax=data.minmax, batch_size=backbone_cfg.batch_size,
                           console=console, desc=f"backbone tokens ({split})", shard=(info.rank, info.world_size),
                           options=loader_options, preprocess=pre, mask_resize=data.mask_resize)
        seconds = time.perf_counter() - t0
        barrier()
        if not info.is_main:
            return {}
        np.save(tmp / "labels.npy", np.asarray(dataset.labels, dtype=np.int64))
        meta = {"grid": list(grid), "classes": list(dataset.classes), "ids": list(dataset.ids),
                "variant": dataset.variant, "embed_dim": backbone.embed_dim, "backbone": backbone.name,
                "weights": backbone.weights_hash, "mean": list(pre.mean), "std": list(pre.std),
                "interpolation": pre.interpolation}
        (tmp / "meta.json").write_text(json.dumps(meta))
        # Rank 0's throughput; every rank encodes about len(dataset) / world_size images.
        return {"images": len(dataset), "images_per_second_rank0": round(n / max(seconds, 1e-9), 2),
                "world_size": info.world_size}

    directory, _, _ = get_or_run(Path(cache.root), "tokens", key, build, config=slice_, log=console.log,
                                 warn=console.warn)
    return TokenStore(directory, key)
