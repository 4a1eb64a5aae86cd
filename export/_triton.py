"""A Triton Inference Server model repository for an exported graph (`dinoqpm-export --triton-repo DIR`).

    DIR/<name>/config.pbtxt     platform onnxruntime_onnx, batch dimension, dynamic batching, an instance group
    DIR/<name>/1/model.onnx     the graph (a copy)
    DIR/<name>/labels.txt       class names, one a line: the classification extension on the `logits` output

Writing the configuration (Triton could derive one from the ONNX file) keeps the batch size, the queue delay, the
instance kind and ONNX Runtime's thread counts explicit and reviewable. The text is Triton's `ModelConfig` protobuf
in text format; tests parse it with the `model_config_pb2` that tritonclient ships. Torch-free: only onnx.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from export._metadata import read_metadata

TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT64: "TYPE_INT64",
                onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.UINT8: "TYPE_UINT8"}


@dataclass(frozen=True)
class TritonOptions:
    """What config.pbtxt fixes. `kind`: "KIND_CPU" or "KIND_GPU"; `threads`: ONNX Runtime intra-op threads per
    instance (0: ONNX Runtime's default, every core)."""

    max_batch_size: int = 8
    max_queue_delay_us: int = 5000
    kind: str = "KIND_CPU"
    count: int = 1
    threads: int = 1


def _tensor(value: onnx.ValueInfoProto, extra: str = "") -> str:
    ttype = value.type.tensor_type
    if ttype.elem_type not in TRITON_TYPES:
        raise ValueError(f"tensor {value.name} has ONNX element type {ttype.elem_type}, not mapped to Triton")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim][1:]  # Triton adds the batch
    return (f'  {{\n    name: "{value.name}"\n    data_type: {TRITON_TYPES[ttype.elem_type]}\n'
            f"    dims: [ {', '.join(map(str, dims))} ]\n{extra}  }}")


def config_text(proto: onnx.ModelProto, name: str, opts: TritonOptions) -> str:
    """config.pbtxt for the graph `proto` served as `name`."""
    inputs = ",\n".join(_tensor(v) for v in proto.graph.input)
    outputs = ",\n".join(_tensor(v, '    label_filename: "labels.txt"\n' if v.name == "logits" else "")
                         for v in proto.graph.output)
    params = "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n'
                     for k, v in (("intra_op_thread_count", opts.threads), ("inter_op_thread_count", 1)))
    return (f'# Written by dinoqpm-export --triton-repo (docs/serving.md).\nname: "{name}"\n'
            f'platform: "onnxruntime_onnx"\nmax_batch_size: {opts.max_batch_size}\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {opts.max_queue_delay_us}\n}}\n"
            f"instance_group [\n  {{\n    kind: {opts.kind}\n    count: {opts.count}\n  }}\n]\n{params}")


def write_triton_repo(model: Path, repo: Path, name: str | None = None, opts: TritonOptions | None = None, *,
                      force: bool = False) -> Path:
    """Lay `model` out as `repo/<name>` (module docstring) and return that folder.

    Raises:
        FileExistsError: `repo/<name>` exists and `force` is not set (nothing is overwritten).
    """
    name = name or model.stem
    folder = repo / name
    if folder.exists() and not force:
        raise FileExistsError(f"{folder} exists already; pass --force to replace it or choose another --triton-repo")
    proto = onnx.load(str(model), load_external_data=False)
    classes = read_metadata(proto, ["classes"])["classes"]
    text = config_text(proto, name, opts or TritonOptions())
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, folder / "1" / "model.onnx")
    (folder / "labels.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    (folder / "config.pbtxt").write_text(text, encoding="utf-8")
    return folder


__all__ = ["TritonOptions", "config_text", "write_triton_repo"]
