"""`export_run`: a trained run directory -> one gated ONNX file (what `python export/onnx.py` does).

Steps: load RUN_DIR/config.yaml and RUN_DIR/checkpoint, rebuild the frozen backbone (and check its weights hash
against the checkpoint's), fold the model (`export._fold`), export the folded graph with the dynamo exporter (and
the unfolded one for the size report), optionally convert to fp16, attach metadata, write it next to `out`, run the
parity gate on the written file, and only then move it into place. A failed gate deletes the file unless `force`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from PIL import Image

from export._fold import fold_model, tensor_elements
from export._graph import DeployModel, UnfoldedModel, export_graph, to_fp16
from export._metadata import (
    PREFIX,
    FoldingReport,
    build_metadata,
    initializer_elements,
    serialized_bytes,
    set_metadata,
)
from export._parity import ParityResult, make_gate_images, open_session, run_gate
from toolkit.config import RunConfig, load_config
from toolkit.data import load_dataset
from toolkit.distributed import seed_everything
from toolkit.model import STD_FLOOR, DinoQPM, SparseHead, create_backbone, load_checkpoint

EXTERNAL_DATA_BYTES = 1_800_000_000  # above this the weights go to `<out>.data` (protobuf's 2 GiB limit)


class ExportError(Exception):
    """A user error (bad run directory, existing output, impossible size): one line, exit status 2."""


class ParityError(ExportError):
    """The exported graph disagrees with torch; the message carries the numbers."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    folding: FoldingReport
    parity: ParityResult
    file_bytes: int
    forced: bool  # written although the gate failed
    seconds: float


def _load_run(run_dir: Path) -> tuple[RunConfig, DinoQPM, dict[str, Any]]:
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir / 'config.yaml'} is missing: --run must be a run directory written by the "
                          "pipeline")
    try:
        model, info = load_checkpoint(run_dir / "checkpoint")
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(str(e)) from e
    if not isinstance(model, DinoQPM) or not isinstance(model.head, SparseHead):
        raise ExportError(f"{run_dir / 'checkpoint'} holds a {info.get('kind')} model; export needs the QPM one")
    return load_config(run_dir / "config.yaml"), model.eval(), info


def _real_pictures(cfg: RunConfig, n: int) -> tuple[list[tuple[str, Image.Image]], str | None]:
    """Up to n test images of the run's dataset, spread over the split; (pictures, why none) when unavailable."""
    if n <= 0:
        return [], None
    try:
        ds = load_dataset(cfg.data, "test")
        picks = np.unique(np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int))
        return [(f"{cfg.data.dataset}:test:{int(i)}", ds[int(i)][0]) for i in picks], None
    except (FileNotFoundError, OSError, ValueError, RuntimeError) as e:
        return [], f"no real images ({type(e).__name__}: {e}); gate ran on random images only"


def _save(proto: onnx.ModelProto, path: Path) -> list[Path]:
    """Write `proto` to `path` (plus `path.data` above EXTERNAL_DATA_BYTES); returns the files written."""
    if serialized_bytes(proto) <= EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path))
        return [path]
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data")
    return [path, path.with_name(path.name + ".data")]


def export_run(run_dir: str | Path, out: str | Path, *, opset: int | None = None,
               image_size: tuple[int, int] | None = None, dynamic_image_size: bool | None = None,
               fp16: bool | None = None, force: bool = False, tolerance: float | None = None, n_random: int = 4,
               n_real: int = 8, measure_unfolded: bool = True,
               log: Callable[[str], None] = print) -> ExportResult:
    """Export a run's DINO-QPM model as one gated ONNX graph (module docstring). Unset options come from the run's
    `export` config section.

    Args:
        run_dir: run directory (config.yaml, checkpoint/).
        out: the .onnx file to write.
        opset: ONNX opset (>= 17).
        image_size: (H, W), multiples of the patch size; default `export.image_size` or the training size.
        dynamic_image_size: make H and W dynamic (the gate then also checks a second size).
        fp16: float16 weights and compute, float32 inputs and outputs.
        force: overwrite `out`, and write it even if the parity gate fails (with a warning).
        tolerance: fp32 gate tolerance relative to max |torch|.
        n_random, n_real: gate images: uniform noise, and test images of the run's dataset when available.
        measure_unfolded: also export the unfolded graph, to report its size (costs one more export).
        log: where progress and reports go.

    Raises:
        ExportError: a user error, before anything is written.
        ParityError: the gate failed and `force` is off; nothing is written.
    """
    t_start = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists already; pass --force to overwrite it (nothing was written)")
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    cfg, model, info = _load_run(run_dir)
    ecfg = cfg.export
    opset = ecfg.opset if opset is None else opset
    dynamic = ecfg.dynamic_image_size if dynamic_image_size is None else dynamic_image_size
    fp16 = ecfg.fp16 if fp16 is None else fp16
    tolerance = ecfg.parity_tolerance if tolerance is None else tolerance
    train_size = int(info["image_size"])
    size = image_size or ((ecfg.image_size,) * 2 if ecfg.image_size else (train_size, train_size))
    size = (int(size[0]), int(size[1]))
    if opset < 17:
        raise ExportError(f"--opset must be >= 17 (LayerNormalization), got {opset}")

    seed_everything(cfg.runtime.seed)  # the pipeline seeds before building; random-init test backbones need it
    # A backbone built for the training size; timm resamples its position grid on the fly for any other size.
    needs_resample = dynamic or size != (train_size, train_size)
    kwargs = {**cfg.backbone.arch_overrides(), **({"dynamic_img_size": True} if needs_resample else {})}
    backbone = create_backbone(cfg.backbone, train_size, model_kwargs=kwargs)
    if info.get("weights_hash") not in (None, backbone.weights_hash):
        raise ExportError(f"the backbone weights ({backbone.weights_hash}) differ from the ones the model was "
                          f"trained on ({info['weights_hash']})")
    patch = backbone.patch_size
    if size[0] % patch or size[1] % patch or min(size) < patch:
        raise ExportError(f"image size {size[0]}x{size[1]} must be positive multiples of the patch size {patch}")
    minmax = bool(info.get("reference_minmax", cfg.data.reference_minmax))
    common = dict(vit=backbone.model, mean=info["mean"], std=info["std"], reference_minmax=minmax)
    reference = UnfoldedModel(model=model, **common).eval()
    deploy = DeployModel(folded=fold_model(model), **common).eval()
    example = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))

    log(f"exporting {run_dir} ({info['backbone']}, {len(info['classes'])} classes, k={model.head.n_features}) at "
        f"{size[0]}x{size[1]}{' (dynamic H, W)' if dynamic else ''}, opset {opset}, {'fp16' if fp16 else 'fp32'}")
    t0 = time.perf_counter()
    proto = export_graph(deploy, example, opset=opset, dynamic_image_size=dynamic)
    log(f"  folded graph exported in {time.perf_counter() - t0:.1f} s")
    before_init = before_bytes = None
    if measure_unfolded:
        t0 = time.perf_counter()
        unfolded = export_graph(reference, example, opset=opset, dynamic_image_size=dynamic)  # like for like
        before_init, before_bytes = initializer_elements(unfolded), serialized_bytes(unfolded)
        del unfolded
        log(f"  unfolded graph (size report only) exported in {time.perf_counter() - t0:.1f} s")
    if fp16:
        proto = to_fp16(proto)
    folding = FoldingReport(params_before=tensor_elements(reference), params_after=tensor_elements(deploy),
                            initializers_before=before_init, initializers_after=initializer_elements(proto),
                            bytes_before=before_bytes, bytes_after=serialized_bytes(proto))
    for line in folding.lines():
        log(line)

    head = model.head
    std = head.std.clamp_min(STD_FLOOR)
    set_metadata(proto, build_metadata(
        info=info, weight=head.weight.numpy(), mean=head.mean.numpy(), std=std.numpy(),
        bias=deploy.qpm.head.linear.bias.detach().numpy(), image_size=size, dynamic_image_size=dynamic, patch=patch,
        reference_minmax=minmax, precision="fp16" if fp16 else "fp32", folding=folding))
    proto.doc_string = (f"DINO-QPM {info['backbone']} -> {len(info['classes'])} classes; inputs float32 RGB in [0, 1]; "
                        "see the dinoqpm.* metadata")

    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        staged = _save(proto, staging / out.name)
        real, why_not = _real_pictures(cfg, n_real)
        sizes = [size] + ([(size[0] + 2 * patch, size[1] + 4 * patch)] if dynamic else [])
        batches = [make_gate_images(s, real=real, n_random=n_random) for s in sizes]
        parity = run_gate(open_session(staged[0]), reference, batches, precision="fp16" if fp16 else "fp32",
                          tolerance=tolerance)
        if why_not:
            parity = dataclasses.replace(parity, notes=[why_not])
        for line in parity.lines():
            log(line)
        if not parity.passed and not force:
            raise ParityError("parity gate failed, nothing was written (pass --force to write it anyway):\n"
                              + "\n".join(parity.lines()))
        forced = not parity.passed
        set_metadata(proto, {PREFIX + "parity": json.dumps({**parity.to_dict(), "forced": forced})})
        staged = _save(proto, staging / out.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        for f in staged:
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    file_bytes = sum((out.parent / f.name).stat().st_size for f in staged)
    seconds = time.perf_counter() - t_start
    log(f"wrote {out} ({file_bytes:,} bytes{', with ' + out.name + '.data' if len(staged) > 1 else ''}) in "
        f"{seconds:.1f} s")
    return ExportResult(path=out, folding=folding, parity=parity, file_bytes=file_bytes, forced=forced,
                        seconds=seconds)


__all__ = ["ExportError", "ExportResult", "ParityError", "export_run"]
