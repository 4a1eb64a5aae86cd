"""`export_run`: a trained run directory -> one gated ONNX file (what `python export/to_onnx.py` does).

Steps: load RUN_DIR/config.yaml and RUN_DIR/checkpoint, rebuild the frozen backbone (and check its weights hash
against the checkpoint's), fold the model (`export._fold`), export the folded graph with the dynamo exporter (and
the unfolded one for the size report), optionally convert to fp16, attach metadata, write it next to `out`, run the
parity gate on the written file, and only then move it into place. A failed gate deletes the file unless `force`.
With int8, the fp32 graph passes the parity gate first, is then quantised (`export._quant`), and the int8 graph must
pass the fidelity gate against the fp32 one on held-out images of the run before it is moved into place.
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
from export._parity import ParityResult, make_gate_images, open_session, run_gate, to_unit_tensor
from export._quant import (
    Int8Fidelity,
    Int8Recipe,
    Int8Thresholds,
    QuantisationError,
    measure_fidelity,
    quantize_int8,
    recipe_metadata,
    run_batched,
)
from toolkit.config import RunConfig, load_config, replace
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
    int8: Int8Fidelity | None = None  # the int8 fidelity gate (int8 exports only)


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


def held_out_images(cfg: RunConfig, split: str, n: int, size: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """Up to n images of a split of the run's dataset, spread evenly over it, as the graph's input.

    Returns:
        images (N, 3, H, W) float32 in [0, 1], labels (N,), and a description of the source.

    Raises:
        ExportError: the split cannot be read (the message says how to fix it).
    """
    try:
        ds = load_dataset(cfg.data, split)  # type: ignore[arg-type]
    except (FileNotFoundError, OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"int8 export needs the run's {cfg.data.dataset} {split} split to check (or calibrate) the "
                          f"quantised graph, but it cannot be read ({type(e).__name__}: {e}); set data.root in "
                          f"the run's config.yaml or export fp32/fp16 instead") from e
    picks = np.unique(np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int))
    items = [ds[int(i)] for i in picks]
    images = torch.stack([to_unit_tensor(item[0], size) for item in items]).numpy()
    labels = np.array([int(item[1]) for item in items], dtype=np.int64)
    return images, labels, f"{cfg.data.dataset}:{split}, {len(picks)} of {len(ds)} images"


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
               fp16: bool | None = None, int8: bool | None = None, force: bool = False,
               tolerance: float | None = None, n_random: int = 4,
               n_real: int = 8, measure_unfolded: bool = True, int8_overrides: dict[str, Any] | None = None,
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
        int8: int8 weights of the weight MatMuls (`export._quant`), gated against the fp32 graph.
        force: overwrite `out`, and write it even if the parity gate fails (with a warning).
        tolerance: fp32 gate tolerance relative to max |torch|.
        n_random, n_real: gate images: uniform noise, and test images of the run's dataset when available.
        measure_unfolded: also export the unfolded graph, to report its size (costs one more export).
        int8_overrides: `export.int8_*` config fields (without the `int8_` prefix) to override, e.g.
            {"min_top1_agreement": 1.0}.
        log: where progress and reports go.

    Raises:
        ExportError: a user error, before anything is written.
        ParityError: a gate (parity, or int8 fidelity) failed and `force` is off; nothing is written.
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
    int8 = ecfg.int8 if int8 is None else int8
    if fp16 and int8:
        raise ExportError("--fp16 and --int8 exclude each other; export one file per precision")
    knobs = {name.removeprefix("int8_"): getattr(ecfg, name) for name in type(ecfg).model_fields
             if name.startswith("int8_")}
    unknown = sorted(set(int8_overrides or {}) - set(knobs))
    if unknown:
        raise ExportError(f"unknown int8 option(s) {unknown}; known: {sorted(knobs)}")
    knobs.update(int8_overrides or {})
    try:  # the config's own checks, plus the recipe's (mode names, value types)
        checked = replace(ecfg, {"int8_" + k: v for k, v in knobs.items()})
        recipe = Int8Recipe(mode=knobs["mode"], per_channel=knobs["per_channel"],
                            keep_fp32=Int8Recipe.parse_keep_fp32(knobs["keep_fp32"]), preprocess=knobs["preprocess"],
                            calibration_images=knobs["calibration_images"], block_size=knobs["block_size"])
        thresholds = Int8Thresholds.from_config(checked)
    except ValueError as e:
        raise ExportError(f"int8 option: {e}") from e
    precision = "fp16" if fp16 else "int8" if int8 else "fp32"
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
    minmax = bool(info.get("reference_minmax", cfg.data.minmax))
    common = dict(vit=backbone.model, mean=info["mean"], std=info["std"], reference_minmax=minmax)
    reference = UnfoldedModel(model=model, **common).eval()
    deploy = DeployModel(folded=fold_model(model), **common).eval()
    example = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))

    log(f"exporting {run_dir} ({info['backbone']}, {len(info['classes'])} classes, k={model.head.n_features}) at "
        f"{size[0]}x{size[1]}{' (dynamic H, W)' if dynamic else ''}, opset {opset}, {precision}")
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
        reference_minmax=minmax, precision="fp32" if int8 else precision, folding=folding))
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
                          tolerance=tolerance)  # int8: the fp32 graph it is quantised from
        if why_not:
            parity = dataclasses.replace(parity, notes=[why_not])
        for line in parity.lines():
            log(line)
        if not parity.passed and not force:
            raise ParityError("parity gate failed, nothing was written (pass --force to write it anyway):\n"
                              + "\n".join(parity.lines()))
        forced = not parity.passed
        set_metadata(proto, {PREFIX + "parity": json.dumps({**parity.to_dict(), "forced": forced})})
        fidelity = None
        if int8:
            proto, fidelity = _quantise_and_gate(proto, staged[0], cfg, size, recipe, thresholds,
                                                  knobs["gate_images"], log)
            if not fidelity.passed and not force:
                raise ParityError("int8 fidelity gate failed, nothing was written (pass --force to write it anyway, or "
                                  "relax/adjust export.int8_*):\n" + "\n".join(fidelity.lines()))
            forced = forced or not fidelity.passed
            set_metadata(proto, {PREFIX + "int8_gate": json.dumps({**fidelity.to_dict(), "forced": forced})})
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
                        seconds=seconds, int8=fidelity)


def _quantise_and_gate(fp32: onnx.ModelProto, fp32_path: Path, cfg: RunConfig, size: tuple[int, int],
                       recipe: Int8Recipe, thresholds: Int8Thresholds, n_gate: int, log: Callable[[str], None]
                       ) -> tuple[onnx.ModelProto, Int8Fidelity]:
    """Quantise the gated fp32 graph and run the int8 fidelity gate against it; returns (int8 graph, gate)."""
    t0 = time.perf_counter()
    calibration = None
    if recipe.mode == "static":
        calibration, _, where = held_out_images(cfg, "train", recipe.calibration_images, size)
        log(f"  int8 calibration: {where}")
    try:
        quant = quantize_int8(fp32, recipe, calibration=calibration)
    except QuantisationError as e:
        raise ExportError(str(e)) from e
    meta = {k.removeprefix(PREFIX): json.loads(p) for k, p in ((q.key, q.value) for q in fp32.metadata_props)
            if k.startswith(PREFIX)}
    info = recipe_metadata(recipe, quant, fp32)
    log(f"  int8 ({info['label']}): {info['quantised']} of {info['weight_matmuls']} weight MatMuls quantised in "
        f"{time.perf_counter() - t0:.1f} s")
    images, labels, where = held_out_images(cfg, "test", n_gate, size)
    qpath = fp32_path.with_name(fp32_path.name + ".int8")  # in the staging folder, removed with it
    onnx.save_model(quant, str(qpath))
    ref = run_batched(open_session(fp32_path), images)
    got = run_batched(open_session(qpath), images)
    qpath.unlink()
    fidelity = measure_fidelity(ref, got, meta, labels=labels, thresholds=thresholds, source=where)
    for line in fidelity.lines():
        log(line)
    set_metadata(quant, {PREFIX + "precision": json.dumps("int8"), PREFIX + "int8": json.dumps(info)})
    return quant, fidelity


__all__ = ["ExportError", "ExportResult", "ParityError", "export_run"]
