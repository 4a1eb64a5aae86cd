"""One exported model behind the service: its ONNX Runtime session, signature, metadata and the image endpoint.

Ray-free (a replica holds one `ServedModel`; tests use it directly). The session, the metadata and every step of the
image path come from `export/predict.py`, so the service and the batch command decode, preprocess, explain and draw
alike: `read_image` is `open_image` on bytes with size limits, `explain_image` is `explain_one` plus `compose`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from export.predict import PredictError, compose, explain_one, open_session, panels, read_metadata, to_input
from serve.protocol import ProtocolError, TensorSpec

ORT_TYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64", "tensor(int64)": "INT64",
             "tensor(int32)": "INT32", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL"}


@dataclass(frozen=True)
class Limits:
    """What one request may send: body bytes (413 above) and decoded image pixels (a decompression bomb is
    refused from the image header, before decoding)."""

    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 25_000_000


def _spec(node: Any) -> TensorSpec:
    if node.type not in ORT_TYPES:
        raise PredictError(f"tensor {node.name} has type {node.type}, which the service does not map")
    return TensorSpec(node.name, ORT_TYPES[node.type], tuple(d if isinstance(d, int) else -1 for d in node.shape))


def png_data_url(image: Image.Image | np.ndarray) -> str:
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class ServedModel:
    """An exported model opened for serving.

    Args:
        path: the .onnx file written by export/to_onnx.py.
        name: the model's name in URLs.
        provider: "cpu" or "cuda" (no silent fallback: `export.predict.open_session`).
        threads: ONNX Runtime's intra-op threads (inter-op: 1); they do not spin-wait (`open_session`), which
            cut a replica's CPU per request by 14 % at the same throughput (BENCHMARKS.md, "Serving").
    """

    def __init__(self, path: str | Path, name: str, provider: str = "cpu", threads: int = 1) -> None:
        self.path, self.name = Path(path), name
        self.session = open_session(self.path, provider, threads=threads, spin=False)
        self.meta = read_metadata(self.session)
        self.inputs = [_spec(n) for n in self.session.get_inputs()]
        self.outputs = [_spec(n) for n in self.session.get_outputs()]
        self.output_names = [t.name for t in self.outputs]
        self.classes: list[str] = list(self.meta["classes"])

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def parameters(self) -> dict[str, Any]:
        """What a client needs to read the outputs, for the model metadata's `parameters`."""
        meta = self.meta
        return {"classes": self.classes, "feature_ids": meta["feature_ids"], "class_features": meta["assignment"],
                "n_per_class": meta.get("n_per_class"), "image_size": meta["image_size"],
                "precision": meta.get("precision"), "head_mean": meta["head"]["mean"],
                "head_std": meta["head"]["std"], "head_bias": meta["head"]["bias"],
                "contribution_rule": meta["head"].get("contribution"), "provider": self.providers[0]}

    # ---------------------------------------------------------------------------------------------------- tensors

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output for one batch. images: (B, 3, H, W) float32 in [0, 1]."""
        return dict(zip(self.output_names, self.session.run(self.output_names, {self.inputs[0].name: images})))

    def run_many(self, batches: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Several requests' inputs as one session call per input size (what dynamic batching runs), split back.

        Args:
            batches: (B_i, 3, H, W) arrays, one per request.
        """
        results: list[dict[str, np.ndarray] | None] = [None] * len(batches)
        for shape in dict.fromkeys(b.shape[1:] for b in batches):
            idx = [i for i, b in enumerate(batches) if b.shape[1:] == shape]
            out = self.run(np.concatenate([batches[i] for i in idx]) if len(idx) > 1 else batches[idx[0]])
            start = 0
            for i in idx:
                n = batches[i].shape[0]
                results[i] = {k: v[start:start + n] for k, v in out.items()}
                start += n
        return results  # type: ignore[return-value]

    def check_image_size(self, images: np.ndarray) -> None:
        """A graph with dynamic H and W still needs multiples of the patch size."""
        multiple = int(self.meta.get("input", {}).get("multiple_of", 1))
        if images.shape[2] % multiple or images.shape[3] % multiple:
            raise ProtocolError(f"input {self.inputs[0].name!r} has H x W {images.shape[2]} x {images.shape[3]}; "
                                f"both must be multiples of {multiple}")

    # ----------------------------------------------------------------------------------------------------- images

    def image_input(self, picture: Image.Image) -> np.ndarray:
        """(1, 3, H, W): predict.py's preprocessing at the size in the metadata."""
        return to_input(picture, tuple(self.meta["image_size"]))[None]

    def explain_image(self, picture: Image.Image, outputs: dict[str, np.ndarray], *, top_k: int = 5,
                      maps: bool = False, filename: str = "upload") -> dict[str, Any]:
        """predict.py's record for one image (top classes, the predicted class's feature contributions); with
        `maps`, its PNG (`png`, identical to the file predict.py writes) and one overlay per feature (`maps`), as
        data URLs. `filename` is only shown (the PNG's header, the record's `image`), never opened."""
        top_k = max(1, min(int(top_k), len(self.classes)))
        pred = {"image": filename,
                **explain_one(outputs["logits"][0], outputs["features"][0], self.meta, top_k)}
        if maps:
            pred["png"] = png_data_url(compose(picture, outputs["feature_maps"][0], pred, filename))
            pred["maps"] = [{"feature": f["feature"], "title": title, "png": png_data_url(arr)}
                            for f, (title, _, arr) in zip(pred["features"],
                                                          panels(picture, outputs["feature_maps"][0], pred)[1:])]
        return pred


def read_image(data: bytes, limits: Limits) -> Image.Image:
    """An uploaded image as RGB, refusing what is not an image or has more than `limits.max_image_pixels` pixels
    (checked from the header, before the pixels are decoded)."""
    if not data:
        raise ProtocolError("the request body is empty; send the image file as the body (e.g. curl --data-binary "
                            "@photo.jpg)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise ProtocolError(f"the image is {w} x {h} = {w * h:,} pixels, over this service's limit of "
                                    f"{limits.max_image_pixels:,}; send a smaller image", status=413)
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ProtocolError(f"the image is over the pixel limit: {e}", status=413) from None
    except UnidentifiedImageError:
        raise ProtocolError("the body is not an image (its format is not recognised); send a PNG, JPEG, BMP, GIF, "
                            "TIFF or WebP file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ProtocolError(f"the image cannot be decoded ({type(e).__name__}: {e}); send a complete PNG, JPEG, BMP, "
                            "GIF, TIFF or WebP file") from None
