"""The Open Inference Protocol (KServe V2, Triton's HTTP/REST API) without a server: parse, validate, encode.

Plain functions on bytes, dicts and numpy arrays, so the whole protocol is tested without Ray or HTTP
(`tests/test_serve_protocol.py`); `serve.app` only moves bytes between them and the network. What is implemented,
from the protocol's `inference_rest.md` and Triton's binary tensor data extension (`extension_binary_data.md`):

- an inference request is a JSON object `{id?, parameters?, inputs: [{name, shape, datatype, parameters?, data?}],
  outputs?: [{name, parameters?}]}`; `data` is row-major (nested or flat lists);
- binary tensor data: the body is the JSON header followed by raw little-endian tensors, the header
  `Inference-Header-Content-Length` gives the JSON's length, a binary input carries `parameters.binary_data_size`
  instead of `data`; an output is returned binary when it asks `parameters.binary_data: true` or the request asks
  `parameters.binary_data_output: true` (what `tritonclient.http` sends by default);
- the classification extension: an output asked with `parameters.classification: k` comes back as the k largest
  values per row as BYTES `"value:index:label"`, as Triton does with a `labels.txt`;
- errors: `{"error": "..."}` with a 4xx status (`ProtocolError`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "classification"]
# Protocol datatype <-> numpy dtype (little-endian, as the binary extension lays tensors out). BYTES is output-only.
DATATYPES: dict[str, np.dtype] = {name: np.dtype(code).newbyteorder("<") for name, code in [
    ("BOOL", "?"), ("UINT8", "u1"), ("UINT16", "u2"), ("UINT32", "u4"), ("UINT64", "u8"), ("INT8", "i1"),
    ("INT16", "i2"), ("INT32", "i4"), ("INT64", "i8"), ("FP16", "f2"), ("FP32", "f4"), ("FP64", "f8")]}


class ProtocolError(Exception):
    """A request the service refuses: `status` (4xx) and a message that names what is wrong."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, protocol datatype and shape (-1 where a dimension varies)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class RequestedOutput:
    """An output a client asked for; `classification` > 0 asks for the top-k labels instead of the tensor."""

    name: str
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    """A parsed, validated inference request: `inputs` are arrays of the model's dtypes and shapes."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def server_metadata(version: str) -> dict[str, Any]:
    """`GET /v2`."""
    return {"name": "dinoqpm-serve", "version": version, "extensions": EXTENSIONS}


def model_metadata(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                   parameters: Mapping[str, Any], version: str = "1") -> dict[str, Any]:
    """`GET /v2/models/{name}`: the protocol allows only strings, numbers and booleans as parameter values, so
    lists and objects (class names, the class -> feature assignment) are JSON-encoded strings."""
    params = {k: v if isinstance(v, str | int | float | bool) else json.dumps(v) for k, v in parameters.items()}
    return {"name": name, "versions": [version], "platform": "onnxruntime_onnx",
            "inputs": [t.to_json() for t in inputs], "outputs": [t.to_json() for t in outputs], "parameters": params}


# ------------------------------------------------------------------------------------------------------- requests


def _header_length(value: str | None, body_len: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise ProtocolError(f"{HEADER} must be an integer, got {value!r}") from None
    if not 0 < length <= body_len:
        raise ProtocolError(f"{HEADER} says the JSON header is {length} bytes, but the body has {body_len}")
    return length


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{what} is not valid JSON ({e}); send a JSON object, with {HEADER} when binary "
                            "tensors follow it") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _shape(tensor: Mapping[str, Any], name: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def _check_shape(shape: tuple[int, ...], spec: TensorSpec) -> None:
    fits = len(shape) == len(spec.shape) and all(s in (-1, d) for d, s in zip(shape, spec.shape))
    if not fits:
        raise ProtocolError(f"input {spec.name!r} has shape {list(shape)}; the model takes {list(spec.shape)} "
                            "(-1: any size)")
    if shape and shape[0] == 0:
        raise ProtocolError(f"input {spec.name!r} has an empty batch (shape {list(shape)})")


def _json_data(data: Any, dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    try:
        arr = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"input {name!r}: 'data' must hold numbers of its datatype ({e})") from None
    count = int(np.prod(shape, dtype=np.int64))
    if arr.size != count:
        raise ProtocolError(f"input {name!r}: 'data' has {arr.size} elements, its shape {list(shape)} needs {count}")
    return arr.reshape(shape)


def parse_infer_request(body: bytes, header_length: str | None, inputs: Sequence[TensorSpec],
                        outputs: Sequence[TensorSpec]) -> InferRequest:
    """Parse and validate one inference request against the model's signature.

    Args:
        body: the request body: JSON, or JSON followed by binary tensors.
        header_length: the `Inference-Header-Content-Length` header, None if absent (JSON only).
        inputs, outputs: the model's tensors.

    Raises:
        ProtocolError: with a message naming the offending field.
    """
    if not body:
        raise ProtocolError("the request body is empty; send a JSON inference request {\"inputs\": [...]}")
    length = _header_length(header_length, len(body))
    head = _json_object(body[:length] if length is not None else body, "the inference request")
    binary, offset = (memoryview(body)[length:], 0) if length is not None else (memoryview(b""), 0)
    specs = {t.name: t for t in inputs}
    tensors = head.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise ProtocolError("the request needs 'inputs': a list of tensors {name, shape, datatype, data}")
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise ProtocolError("each entry of 'inputs' must be an object with a 'name'")
        name = tensor["name"]
        if name not in specs:
            raise ProtocolError(f"unknown input {name!r}; the model's inputs are {sorted(specs)}")
        if name in arrays:
            raise ProtocolError(f"input {name!r} is given twice")
        spec = specs[name]
        if tensor.get("datatype") != spec.datatype:
            raise ProtocolError(f"input {name!r} has datatype {tensor.get('datatype')!r}; the model takes "
                                f"{spec.datatype}")
        shape = _shape(tensor, name)
        _check_shape(shape, spec)
        dtype = DATATYPES[spec.datatype]
        params = tensor.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is None:
            if "data" not in tensor:
                raise ProtocolError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            arrays[name] = _json_data(tensor["data"], dtype, shape, name)
            continue
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not isinstance(size, int) or size != need:
            raise ProtocolError(f"input {name!r}: binary_data_size is {size!r}, but shape {list(shape)} of "
                                f"{spec.datatype} is {need} bytes")
        if len(binary) - offset < size:
            raise ProtocolError(f"input {name!r}: the body holds {len(binary) - offset} bytes of binary data after "
                                f"the {length or len(body)}-byte JSON header, but binary_data_size says {size}")
        arrays[name] = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
        offset += size
    if offset != len(binary):
        raise ProtocolError(f"the body has {len(binary) - offset} bytes after the binary tensors its header "
                            "announces")
    missing = sorted(set(specs) - set(arrays))
    if missing:
        raise ProtocolError(f"missing input(s) {missing}")
    if len({a.shape[0] for a in arrays.values()}) > 1:
        raise ProtocolError(f"the inputs disagree on the batch size: { {k: a.shape[0] for k, a in arrays.items()} }")
    params = head.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    return InferRequest(id=None if head.get("id") is None else str(head["id"]), inputs=arrays,
                        outputs=_requested(head.get("outputs"), bool(params.get("binary_data_output")), outputs),
                        parameters=params)


def _requested(asked: Any, binary_default: bool, outputs: Sequence[TensorSpec]) -> list[RequestedOutput]:
    names = [t.name for t in outputs]
    if asked is None:
        return [RequestedOutput(n, binary_default) for n in names]
    if not isinstance(asked, list) or not asked:
        raise ProtocolError("'outputs' must be a non-empty list of {name, parameters?}; leave it out for every output")
    out = []
    for entry in asked:
        if not isinstance(entry, dict) or entry.get("name") not in names:
            name = entry.get("name") if isinstance(entry, dict) else entry
            raise ProtocolError(f"unknown output {name!r}; the model's outputs are {names}")
        params = entry.get("parameters") or {}
        k = params.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ProtocolError(f"output {entry['name']!r}: parameters.classification must be a count >= 0, got {k!r}")
        out.append(RequestedOutput(entry["name"], bool(params.get("binary_data", binary_default)), k))
    return out


# ------------------------------------------------------------------------------------------------------ responses


def classify(values: np.ndarray, k: int, labels: Sequence[str]) -> np.ndarray:
    """The classification extension: per row of (B, C) `values`, the k largest as b"value:index:label", (B, k)."""
    k = min(k, values.shape[-1])
    order = np.argsort(-values, axis=-1, kind="stable")[:, :k]
    rows = [[f"{row[i]:f}:{i}:{labels[i] if i < len(labels) else ''}".encode() for i in idx]
            for row, idx in zip(values, order)]
    return np.array(rows, dtype=object)


def _bytes_tensor(arr: np.ndarray) -> bytes:
    """BYTES elements in the binary layout: each a 4-byte little-endian length, then its bytes."""
    return b"".join(len(v).to_bytes(4, "little") + v for v in arr.reshape(-1))


def encode_infer_response(model_name: str, request: InferRequest, results: Mapping[str, np.ndarray],
                          labels: Sequence[str], version: str = "1") -> tuple[bytes, dict[str, str]]:
    """The response body and headers for `request` given every output of the model (`results`)."""
    tensors, chunks = [], []
    for want in request.outputs:
        arr = np.ascontiguousarray(results[want.name])
        if want.classification:
            arr = classify(arr.reshape(arr.shape[0], -1), want.classification, labels)
        datatype = "BYTES" if arr.dtype == object else next(k for k, v in DATATYPES.items() if v == arr.dtype)
        tensor: dict[str, Any] = {"name": want.name, "datatype": datatype, "shape": list(arr.shape)}
        if want.binary:
            raw = _bytes_tensor(arr) if datatype == "BYTES" else arr.astype(DATATYPES[datatype], copy=False).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = [v.decode() for v in arr.reshape(-1)] if datatype == "BYTES" else arr.reshape(-1).tolist()
        tensors.append(tensor)
    head: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": tensors}
    if request.id is not None:
        head["id"] = request.id
    header = json.dumps(head).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return b"".join([header, *chunks]), {"content-type": "application/octet-stream", HEADER: str(len(header))}
