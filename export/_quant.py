"""int8 quantisation of the exported fp32 graph, and the fidelity gate that decides whether it may ship.

Quantisation (`quantize_int8`) uses ONNX Runtime's own quantiser on the fp32 graph that already passed the parity
gate. What is quantised and how is an `Int8Recipe` (config `export.int8_*`):
    mode         "dynamic": int8 weights, activations quantised per call from their own range, one scale per tensor
                 (MatMulInteger kernels); "static": QDQ with activation ranges calibrated on images of the run's
                 training split; "blockwise": int8 weights with one scale per block of `block_size` inputs, and
                 activations quantised per block of the same size inside the kernel (MatMulNBits, 8 bits,
                 accuracy_level 4): finer scales, so closer to fp32, but ONNX Runtime's 8-bit kernel is slower.
    per_channel  one weight scale per output channel instead of one per tensor.
    keep_fp32    module-name globs (as in the torch model: `vit.blocks.11.mlp.fc2`, `qpm.adapter.linears.2`) whose
                 MatMuls stay float32; the exporter records each node's module in `pkg.torch.onnx.name_scopes`.
    preprocess   ONNX Runtime's `quant_pre_process` (shape inference; its graph optimisation is skipped because it
                 drops the node scopes that `keep_fp32` selects by).
Only MatMuls with a constant weight are quantised (the ViT's qkv/proj/fc1/fc2 and the adapter); the attention's
activation x activation MatMuls, the patch-embedding Conv, LayerNorm, Softmax and the tiny (C, k) head stay float32.

The fidelity gate (`measure_fidelity`, `Int8Thresholds`) compares the int8 graph with the fp32 graph on held-out
labelled images of the run (its test split): top-1 agreement, per-image Pearson correlation of the k feature maps,
Spearman rank agreement of the m contributions of the (fp32) predicted class, and the accuracy difference.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from export._graph import INPUT_NAME, OUTPUT_NAMES

if TYPE_CHECKING:
    from toolkit.config import ExportConfig

QUANTISED_OPS = ("MatMul",)
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
# Always float32: the (C, k) head is a few hundred multiply-adds, and its logits are the sums the explanation splits.
ALWAYS_FP32 = ("qpm.head*",)


class QuantisationError(ValueError):
    """The recipe cannot be applied to this graph (e.g. a keep_fp32 pattern matches nothing)."""


@dataclass(frozen=True)
class Int8Recipe:
    """How the fp32 graph is quantised (module docstring)."""

    mode: Literal["dynamic", "static", "blockwise"] = "dynamic"
    per_channel: bool = True
    keep_fp32: tuple[str, ...] = ()
    preprocess: bool = False
    calibration_images: int = 64  # static only
    calibrate_method: Literal["minmax", "percentile", "entropy"] = "minmax"  # static only
    block_size: int = 32  # blockwise only

    def __post_init__(self) -> None:
        if self.mode not in ("dynamic", "static", "blockwise"):
            raise ValueError(f"mode must be dynamic, static or blockwise, got {self.mode!r}")
        if self.calibrate_method not in ("minmax", "percentile", "entropy"):
            raise ValueError(f"calibrate_method must be minmax, percentile or entropy, got {self.calibrate_method!r}")
        for name in ("per_channel", "preprocess"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def label(self) -> str:
        parts = [self.mode, f"blocks of {self.block_size}" if self.mode == "blockwise" else
                 "per-channel" if self.per_channel else "per-tensor"]
        if self.mode == "static":
            parts.append(f"{self.calibrate_method} on {self.calibration_images} train images")
        if self.preprocess:
            parts.append("pre-processed")
        parts.append("fp32: " + (", ".join(self.keep_fp32) if self.keep_fp32 else "none"))
        return ", ".join(parts)

    @staticmethod
    def parse_keep_fp32(text: str | None) -> tuple[str, ...]:
        """`export.int8_keep_fp32` ("a, b.*" or empty) -> ("a", "b.*")."""
        return tuple(p.strip() for p in (text or "").split(",") if p.strip())


@dataclass(frozen=True)
class Int8Thresholds:
    """The fidelity gate's limits. Their defaults live in one place, the config (`export.int8_min_*`,
    `export.int8_max_accuracy_drop` in toolkit/config.py): build them with `from_config`."""

    min_top1_agreement: float
    min_map_correlation: float  # every image
    min_rank_agreement: float  # mean over images of the Spearman correlation of the m contributions
    max_accuracy_drop: float

    @classmethod
    def from_config(cls, export: ExportConfig) -> Int8Thresholds:
        """The thresholds `export.int8_<name>` of an export config."""
        return cls(**{f.name: getattr(export, f"int8_{f.name}") for f in dataclasses.fields(cls)})

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [-1, 1], got {value!r}")


@dataclass(frozen=True)
class Int8Fidelity:
    """The int8 graph against the fp32 graph on `n_images` held-out images (rates in [0, 1])."""

    n_images: int
    source: str
    top1_agreement: float
    min_map_correlation: float
    mean_map_correlation: float
    p05_map_correlation: float  # 5th percentile over images
    rank_agreement: float  # mean Spearman correlation of the m contributions of the fp32-predicted class
    same_ranking: float  # share of images whose m contributions keep exactly the same order
    same_top_feature: float  # share of images whose most contributing feature is the same
    accuracy_fp32: float | None  # None without labels
    accuracy_int8: float | None
    flip_max_margin: float | None  # largest fp32 top-1 minus top-2 logit among the images that change class
    median_margin: float  # the same margin's median over all images, for scale
    thresholds: Int8Thresholds
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy_fp32 is None or self.accuracy_int8 is None:
            return None
        return self.accuracy_fp32 - self.accuracy_int8

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_drop": self.accuracy_drop, "passed": self.passed}

    def lines(self) -> list[str]:
        t = self.thresholds
        acc = ("accuracy n/a (no labels)" if self.accuracy_drop is None else
               f"accuracy {self.accuracy_fp32:.4f} fp32 -> {self.accuracy_int8:.4f} int8 (drop "
               f"{100 * self.accuracy_drop:+.2f} points, max {100 * t.max_accuracy_drop:g})")
        out = [f"int8 fidelity gate vs fp32, {self.n_images} held-out images ({self.source}): "
               f"{'PASSED' if self.passed else 'FAILED'}",
               f"  top-1 agreement {100 * self.top1_agreement:.2f} % (min {100 * t.min_top1_agreement:g} %)" + (
                   "" if self.flip_max_margin is None else
                   f"; the images that change class have fp32 top-2 logit margins <= {self.flip_max_margin:.3f} "
                   f"(median margin {self.median_margin:.2f})"),
               f"  feature-map correlation per image: min {self.min_map_correlation:.4f} (min "
               f"{t.min_map_correlation:g}), 5th pct {self.p05_map_correlation:.4f}, mean "
               f"{self.mean_map_correlation:.4f}",
               f"  contribution rank agreement (Spearman, m features of the predicted class): mean "
               f"{self.rank_agreement:.4f} (min {t.min_rank_agreement:g}); same order "
               f"{100 * self.same_ranking:.1f} %, same top feature {100 * self.same_top_feature:.1f} %",
               f"  {acc}"]
        return out + [f"  FAIL: {f}" for f in self.failures]


# ------------------------------------------------------------------------------------------------- quantisation


def node_module(node: onnx.NodeProto) -> str | None:
    """The torch module a node was exported from (`vit.blocks.3.mlp.fc2`), from the exporter's name scopes."""
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            scopes = json.loads(prop.value.replace("'", '"'))
            return scopes[-2] if len(scopes) >= 2 else None
    return None


def weight_matmuls(proto: onnx.ModelProto) -> list[tuple[str, str | None]]:
    """(node name, module) of every MatMul whose second input is a constant weight, in graph order."""
    inits = {t.name for t in proto.graph.initializer}
    return [(n.name, node_module(n)) for n in proto.graph.node if n.op_type in QUANTISED_OPS and n.input[1] in inits]


def excluded_nodes(proto: onnx.ModelProto, patterns: Sequence[str]) -> list[str]:
    """Names of the weight MatMuls whose module matches one of `patterns` (fnmatch globs).

    Raises:
        QuantisationError: a pattern matches no weight MatMul (a typo would otherwise silently quantise it).
    """
    nodes = weight_matmuls(proto)
    out: list[str] = []
    for pat in patterns:
        hit = [name for name, module in nodes if module is not None and fnmatch.fnmatchcase(module, pat)]
        if not hit:
            known = sorted({m for _, m in nodes if m})
            raise QuantisationError(f"export.int8_keep_fp32 pattern {pat!r} matches no quantisable MatMul; modules "
                                    f"are e.g. {', '.join(known[:3])}, ..., {known[-1] if known else ''}")
        out += [h for h in hit if h not in out]
    return out


def always_fp32_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes of the `ALWAYS_FP32` modules (ONNX Runtime turns the head's Gemm into a MatMul)."""
    return [n.name for n in proto.graph.node if (m := node_module(n)) is not None
            and any(fnmatch.fnmatchcase(m, p) for p in ALWAYS_FP32)]


class _ImageReader:
    """`onnxruntime.quantization.CalibrationDataReader` over (N, 3, H, W) float32 images, one per call."""

    def __init__(self, images: np.ndarray) -> None:
        self._it = iter(images[i:i + 1] for i in range(len(images)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}

    def __len__(self) -> int:  # pragma: no cover - the quantiser only iterates
        return 0


def _nbits_quantizer() -> type:
    """`MatMulNBitsQuantizer`, imported without the `logging.basicConfig(level=INFO)` its module runs on import."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    return MatMulNBitsQuantizer


def _quantise_file(proto: onnx.ModelProto, recipe: Int8Recipe, include: list[str],
                   calibration: np.ndarray | None) -> onnx.ModelProto:
    """ONNX Runtime's quantiser works on files: write, (pre-process,) quantise, read back."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    MatMulNBitsQuantizer = _nbits_quantizer()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(proto, str(src))
        if recipe.preprocess:
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(pre), skip_optimization=True)
            src = pre
        if recipe.mode == "blockwise":
            quantizer = MatMulNBitsQuantizer(str(src), bits=8, block_size=recipe.block_size, is_symmetric=True,
                                             accuracy_level=4, nodes_to_include=include)
            quantizer.process()
            return quantizer.model.model
        if recipe.mode == "dynamic":
            quantize_dynamic(src, dst, op_types_to_quantize=list(QUANTISED_OPS), per_channel=recipe.per_channel,
                             weight_type=QuantType.QInt8, nodes_to_quantize=include,
                             extra_options={"MatMulConstBOnly": True})
        else:
            method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                      "entropy": CalibrationMethod.Entropy}[recipe.calibrate_method]
            quantize_static(src, dst, _ImageReader(np.asarray(calibration, dtype=np.float32)),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTISED_OPS),
                            per_channel=recipe.per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_quantize=include, calibrate_method=method,
                            extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(dst))


def quantize_int8(fp32: onnx.ModelProto | str | Path, recipe: Int8Recipe, *,
                  calibration: np.ndarray | None = None) -> onnx.ModelProto:
    """The int8 graph of `fp32` under `recipe` (module docstring); metadata props are carried over.

    Args:
        fp32: the exported fp32 graph (proto or file).
        recipe: what to quantise and how.
        calibration: (N, 3, H, W) float32 images in [0, 1] for static mode (the run's training split).

    Raises:
        QuantisationError: static mode without calibration images, or a keep_fp32 pattern that matches nothing.
    """
    proto = fp32 if isinstance(fp32, onnx.ModelProto) else onnx.load(str(fp32))
    if recipe.mode == "static" and (calibration is None or not len(calibration)):
        raise QuantisationError("static int8 needs calibration images (the run's training split could not be read); "
                                "use export.int8_mode=dynamic")
    # An explicit allow-list: ONNX Runtime rewrites the head's Gemm into a renamed MatMul, which an exclude-list would
    # miss, and the head must stay fp32 so that the contributions predict.py computes still add up to the logit.
    skip = set(excluded_nodes(proto, recipe.keep_fp32)) | set(always_fp32_nodes(proto))
    include = [name for name, _ in weight_matmuls(proto) if name not in skip]
    # The quantisers log "consider pre-processing" and per-tensor notes (root logger), and one INFO line per node
    # (MatMulNBits); the exporter prints its own summary.
    _nbits_quantizer()  # before the levels are saved: importing it configures the root logger
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    handlers = list(loggers[0].handlers)  # module-level logging.warning() would add a stderr handler to the root
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        out = _quantise_file(proto, recipe, include, calibration)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        loggers[0].handlers[:] = handlers
    del out.metadata_props[:]
    out.metadata_props.extend(proto.metadata_props)
    out.doc_string = proto.doc_string
    return out


def recipe_metadata(recipe: Int8Recipe, proto: onnx.ModelProto, fp32: onnx.ModelProto) -> dict[str, Any]:
    """What `dinoqpm.int8` records: the recipe, and which weight MatMuls were quantised and which kept."""
    total = weight_matmuls(fp32)
    kept = excluded_nodes(fp32, recipe.keep_fp32)
    ops = {n.op_type for n in proto.graph.node}
    return {"recipe": {**asdict(recipe), "keep_fp32": list(recipe.keep_fp32)}, "label": recipe.label(),
            "weight_matmuls": len(total), "quantised": len(total) - len(kept),
            "kept_fp32_modules": sorted({m for name, m in total if name in kept and m}) + list(ALWAYS_FP32),
            "quantised_ops": sorted(ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulNBits",
                                           "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}),
            "weights": "int8 (QInt8, symmetric)", "onnxruntime": ort.__version__}


# ------------------------------------------------------------------------------------------------------ fidelity


def run_batched(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    """All outputs of `session` on (N, 3, H, W) images, concatenated over batches."""
    parts = [session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[i:i + batch_size]})
             for i in range(0, len(images), batch_size)]
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(OUTPUT_NAMES)}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    sx, sy = x.std(), y.std()
    if sx < 1e-12 or sy < 1e-12:
        return 1.0 if np.allclose(x, y, atol=1e-3 * (1.0 + np.abs(y).max())) else 0.0
    return float(np.mean((x - x.mean()) * (y - y.mean())) / (sx * sy))


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties averaged."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.arange(len(v), dtype=np.float64)
    for value in np.unique(v):
        tie = v == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def contributions(features: np.ndarray, cls: int, meta: dict[str, Any]) -> np.ndarray:
    """The m contributions W_cj (f_j - mean_j) / std_j of class `cls` (metadata `head`), in assignment order.

    Args:
        features: (k,) graph output for one image.
    """
    idx = np.asarray(meta["assignment"][cls], dtype=np.int64)
    mean, std = (np.asarray(meta["head"][key], np.float64)[idx] for key in ("mean", "std"))
    return (features[idx].astype(np.float64) - mean) / std


def measure_fidelity(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], meta: dict[str, Any], *,
                     labels: np.ndarray | None, thresholds: Int8Thresholds, source: str) -> Int8Fidelity:
    """Compare int8 outputs `got` with fp32 outputs `ref` (both from `run_batched`) and apply `thresholds`.

    Args:
        ref, got: {"logits": (N, C), "feature_maps": (N, k, h, w), "features": (N, k)}.
        meta: the model's `dinoqpm.*` metadata (assignment, head mean/std).
        labels: (N,) true classes, or None (accuracy is then not gated).
        thresholds: the gate's limits.
        source: where the images came from (for the report).
    """
    n = len(ref["logits"])
    pred_ref, pred_got = ref["logits"].argmax(1), got["logits"].argmax(1)
    top2 = np.sort(ref["logits"].astype(np.float64), axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0] if top2.shape[1] == 2 else np.zeros(n)
    flipped = pred_ref != pred_got
    maps_ref = ref["feature_maps"].reshape(n, -1).astype(np.float64)
    maps_got = got["feature_maps"].reshape(n, -1).astype(np.float64)
    corr = np.array([_pearson(a, b) for a, b in zip(maps_got, maps_ref)])
    spearman, same_order, same_top = [], [], []
    for i in range(n):
        c = int(pred_ref[i])
        a, b = contributions(ref["features"][i], c, meta), contributions(got["features"][i], c, meta)
        ra, rb = _ranks(a), _ranks(b)
        spearman.append(_pearson(ra, rb) if len(a) > 1 else 1.0)
        same_order.append(bool(np.array_equal(np.argsort(-a, kind="stable"), np.argsort(-b, kind="stable"))))
        same_top.append(int(np.argmax(a)) == int(np.argmax(b)))
    acc_ref = acc_got = None
    if labels is not None:
        acc_ref, acc_got = float((pred_ref == labels).mean()), float((pred_got == labels).mean())
    fid = Int8Fidelity(n_images=n, source=source, top1_agreement=float((pred_ref == pred_got).mean()),
                       min_map_correlation=float(corr.min()), mean_map_correlation=float(corr.mean()),
                       p05_map_correlation=float(np.percentile(corr, 5)), rank_agreement=float(np.mean(spearman)),
                       same_ranking=float(np.mean(same_order)), same_top_feature=float(np.mean(same_top)),
                       accuracy_fp32=acc_ref, accuracy_int8=acc_got,
                       flip_max_margin=float(margins[flipped].max()) if flipped.any() else None,
                       median_margin=float(np.median(margins)), thresholds=thresholds)
    t, fails = thresholds, []
    if not fid.top1_agreement >= t.min_top1_agreement:  # `not >=` also catches NaN
        fails.append(f"top-1 agreement {100 * fid.top1_agreement:.2f} % < {100 * t.min_top1_agreement:g} % "
                     f"({int(round((1 - fid.top1_agreement) * n))} of {n} images change class)")
    if not fid.min_map_correlation >= t.min_map_correlation:
        worst = int(np.argmin(corr))
        fails.append(f"feature-map correlation {fid.min_map_correlation:.4f} < {t.min_map_correlation:g} on image "
                     f"{worst} ({int((corr < t.min_map_correlation).sum())} of {n} images below)")
    if not fid.rank_agreement >= t.min_rank_agreement:
        fails.append(f"contribution rank agreement {fid.rank_agreement:.4f} < {t.min_rank_agreement:g}")
    drop = fid.accuracy_drop
    if drop is not None and not drop <= t.max_accuracy_drop + 1e-12:
        fails.append(f"accuracy drop {100 * drop:.2f} points > {100 * t.max_accuracy_drop:g}")
    if any(math.isnan(v) for v in (fid.top1_agreement, fid.min_map_correlation, fid.rank_agreement)):
        fails.append("NaN in the int8 outputs")
    return dataclasses.replace(fid, failures=fails)


__all__ = ["Int8Fidelity", "Int8Recipe", "Int8Thresholds", "QuantisationError", "contributions", "excluded_nodes",
           "measure_fidelity", "node_module", "quantize_int8", "recipe_metadata", "run_batched", "weight_matmuls"]
