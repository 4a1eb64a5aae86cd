"""Namespaced `metadata_props` of the exported graph and the before/after-folding size report.

Every value is a JSON string under a `dinoqpm.` key (one namespace, so other tools' keys cannot clash), plus the
three standard image keys of the ONNX metadata spec. `export/predict.py` needs nothing else: class names,
preprocessing size, the class -> feature assignment and the head's mean/std (to split each logit into per-feature
contributions) all live here. int8 graphs add `dinoqpm.int8` (the quantisation recipe) and `dinoqpm.int8_gate` (the
fidelity gate's numbers); their `dinoqpm.parity` is the gate of the fp32 graph they were quantised from. Read back with
`onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map` or `read_metadata`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

PREFIX = "dinoqpm."
SCHEMA_VERSION = 1
# How predict.py splits a logit of the folded head logits = W' f + b (W'_cj = W_cj / sigma_j, b_c = -sum_j W'_cj mu_j).
CONTRIBUTION_RULE = ("contribution_j = W'_cj * f_j + b_cj with W'_cj = W_cj / std_j and b_cj = -W'_cj * mean_j: the "
                     "folded bias b_c = sum_j b_cj is split over the class's features by the term each feature's "
                     "standardisation put there, so contribution_j = W_cj (f_j - mean_j) / std_j as in the unfolded "
                     "model, and the m contributions of a class add up to its logit")


@dataclass(frozen=True)
class FoldingReport:
    """Sizes of the graph before and after folding.

    Attributes:
        params_before, params_after: floats stored by the torch modules (parameters and float buffers such as BN
            running statistics; `export._fold.tensor_elements`), backbone included.
        initializers_before, initializers_after: elements of the ONNX initializers of the two graphs.
        bytes_before, bytes_after: serialised size of the two graphs without metadata (the file size `onnx.save`
            gives); None for `bytes_before` when the unfolded graph was not exported.
    """

    params_before: int
    params_after: int
    initializers_before: int | None
    initializers_after: int
    bytes_before: int | None
    bytes_after: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per quantity."""
        def row(name: str, before: int | None, after: int, unit: str = "") -> str:
            if before is None:
                return f"  {name:<22} {'n/a':>14} -> {after:>14,}{unit}"
            return f"  {name:<22} {before:>14,} -> {after:>14,}{unit}  ({after / max(before, 1):.3f}x)"
        return ["folding (before -> after):",
                row("torch parameters", self.params_before, self.params_after),
                row("ONNX initializers", self.initializers_before, self.initializers_after),
                row("graph size", self.bytes_before, self.bytes_after, " bytes")]


def initializer_elements(proto: onnx.ModelProto) -> int:
    """Number of elements in the graph's initializers (the stored weights)."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in proto.graph.initializer)


def serialized_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of `proto` as one file; above protobuf's 2 GiB limit, the initializer payload plus the rest."""
    try:
        return proto.ByteSize()
    except ValueError:  # > 2 GiB: protobuf refuses to size it
        return sum(len(t.raw_data) for t in proto.graph.initializer)


def build_metadata(*, info: Mapping[str, Any], weight: np.ndarray, mean: np.ndarray, std: np.ndarray,
                   bias: np.ndarray, image_size: tuple[int, int], dynamic_image_size: bool, patch: int,
                   reference_minmax: bool, precision: str, folding: FoldingReport) -> dict[str, str]:
    """The metadata of one export, as {key: string}.

    Args:
        info: checkpoint info (`toolkit.model.load_checkpoint`): classes, selection, image size, mean/std,
            backbone, weights_hash, dataset_variant, toolkit_version, config_hash.
        weight: the binary class-feature matrix W, shape (C, k).
        mean, std: the head's standardisation, shape (k,), std already floored at 1e-6.
        bias: the folded bias b = -(W / std) mean, shape (C,).
        image_size: (H, W) the graph expects (dynamic graphs: the size to resize to by default).
        dynamic_image_size: whether H and W are dynamic axes.
        patch: the patch size (H and W must be multiples of it).
        reference_minmax: whether the min-max quirk is in the graph.
        precision: "fp32" or "fp16" (weights and compute; inputs and outputs are float32 either way); int8 graphs
            are built as fp32 and relabelled after quantisation.
        folding: the size report.
    """
    weight = np.asarray(weight)
    assignment = [np.flatnonzero(row).tolist() for row in weight]
    h, w = image_size
    values: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "classes": list(info["classes"]),
        "feature_ids": [int(c) for c in info["selection"]],
        "assignment": assignment,
        "n_per_class": int(weight[0].sum()) if len(weight) else 0,
        "image_size": [int(h), int(w)],
        "mean": [float(v) for v in info["mean"]],
        "std": [float(v) for v in info["std"]],
        "backbone": info["backbone"],
        "weights_hash": info["weights_hash"],
        "dataset_variant": info.get("dataset_variant"),
        "toolkit_version": info.get("toolkit_version"),
        "config_hash": info.get("config_hash"),
        "precision": precision,
        "input": {"name": "image", "shape": ["batch", 3, "height" if dynamic_image_size else h,
                                             "width" if dynamic_image_size else w],
                  "dtype": "float32", "range": [0.0, 1.0], "layout": "NCHW", "channels": "RGB",
                  "dynamic_image_size": dynamic_image_size, "multiple_of": patch},
        "preprocess": {"resize": [int(h), int(w)], "interpolation": "bicubic", "crop": None, "scale": "x / 255",
                       "normalize_in_graph": True, "reference_minmax_in_graph": reference_minmax},
        "outputs": {"logits": ["batch", "classes"], "feature_maps": ["batch", "k", "height / patch", "width / patch"],
                    "features": ["batch", "k"]},
        "head": {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
                 "bias": [float(v) for v in bias], "weight": "binary W (see assignment) / std",
                 "contribution": CONTRIBUTION_RULE},
        "folding": folding.to_dict(),
    }
    props = {PREFIX + k: json.dumps(v) for k, v in values.items()}
    # Standard keys of the ONNX metadata spec (experimental) for image inputs.
    props.update({"Image.BitmapPixelFormat": "Rgb8", "Image.ColorSpaceGamma": "SRGB",
                  "Image.NominalPixelRange": "Normalized_0_1"})
    return props


def set_metadata(proto: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Replace any existing entries of the same keys and add the rest (in place)."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(path: str | Path | onnx.ModelProto, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """The `dinoqpm.*` entries of a model file (or proto), JSON-decoded and without the prefix."""
    proto = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path), load_external_data=False)
    out = {p.key.removeprefix(PREFIX): json.loads(p.value) for p in proto.metadata_props if p.key.startswith(PREFIX)}
    return out if keys is None else {k: out[k] for k in keys}


__all__ = ["CONTRIBUTION_RULE", "FoldingReport", "build_metadata", "initializer_elements", "read_metadata",
           "serialized_bytes", "set_metadata"]
