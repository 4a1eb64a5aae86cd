"""The exported module, its unfolded torch reference, the dynamo export and the fp16 conversion.

The graph takes `image` float32 (B, 3, H, W) in [0, 1] (a square bicubic resize of the picture, as
`toolkit.data.make_transform` does before `ToTensor`) and applies the backbone's normalisation itself, plus the
reference's per-image min-max quirk when the run trained with `data.reference_minmax` (RobertZimm/DINO-QPM). Outputs:
`logits` (B, C), `feature_maps` (B, k, h, w) of the k selected features, `features` (B, k).

Only the dynamo exporter is used: the legacy one freezes the position-embedding resample at the export size, so a
graph with dynamic H and W breaks at any other size.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence

import onnx
import torch
from torch import Tensor, nn

from export._fold import FoldedQPM
from toolkit.model import DinoQPM, join_tokens

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "feature_maps", "features")
MINMAX_EPS = 1e-12  # the floor of toolkit.data._MinMax


def normalise(images: Tensor, *, mean: Tensor, std: Tensor, reference_minmax: bool) -> Tensor:
    """[0, 1] images -> backbone input, exactly as `toolkit.data.make_transform` after `ToTensor`.

    Args:
        images: (B, 3, H, W) in [0, 1].
        mean, std: per-channel statistics, shape (3,).
        reference_minmax: per-image global min-max rescale to [0, 1] after Normalize, then clip (the reference quirk).

    Returns:
        (B, 3, H, W).
    """
    x = (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    if reference_minmax:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = ((x - lo) / (hi - lo).clamp_min(MINMAX_EPS)).clamp(0.0, 1.0)
    return x


class _Preprocess(nn.Module):
    """Normalisation constants as buffers, so they become graph initializers."""

    mean: Tensor
    std: Tensor

    def __init__(self, *, mean: Sequence[float], std: Sequence[float], reference_minmax: bool) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))
        self.reference_minmax = reference_minmax

    def forward(self, images: Tensor) -> Tensor:
        return normalise(images, mean=self.mean, std=self.std, reference_minmax=self.reference_minmax)


class DeployModel(nn.Module):
    """What the ONNX graph computes: normalise, frozen ViT, folded adapter and head.

    Args:
        vit: the timm ViT of `toolkit.model.Backbone` (`backbone.model`), eval mode.
        folded: `export._fold.fold_model(model)`.
        mean, std: the backbone's normalisation, per channel.
        reference_minmax: bake the reference's min-max quirk into the graph.
    """

    def __init__(self, *, vit: nn.Module, folded: FoldedQPM, mean: Sequence[float], std: Sequence[float],
                 reference_minmax: bool) -> None:
        super().__init__()
        self.pre = _Preprocess(mean=mean, std=std, reference_minmax=reference_minmax)
        self.vit = vit
        self.qpm = folded
        self.patch = int(vit.patch_embed.patch_size[0])
        self.prefix = int(vit.num_prefix_tokens)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Args: image (B, 3, H, W) in [0, 1]. Returns: logits (B, C), feature_maps (B, k, h, w), features (B, k)."""
        tokens = self.vit.forward_features(self.pre(image))  # (B, prefix + P, D), final LayerNorm applied
        grid = (image.shape[2] // self.patch, image.shape[3] // self.patch)
        return self.qpm(tokens[:, self.prefix:], grid)


class UnfoldedModel(nn.Module):
    """The original computation, nothing folded: normalise, ViT, tokens with CLS last, `DinoQPM.forward`.

    This is the torch side of the parity gate and the "before folding" graph of the size report. The DINO-QPM grid
    follows the input size, so the reference also covers images of another size than the training one.

    Args:
        vit: the timm ViT (`backbone.model`).
        model: the trained DINO-QPM model with its sparse head, eval mode.
        mean, std, reference_minmax: as for `DeployModel`.
    """

    def __init__(self, *, vit: nn.Module, model: DinoQPM, mean: Sequence[float], std: Sequence[float],
                 reference_minmax: bool) -> None:
        super().__init__()
        self.pre = _Preprocess(mean=mean, std=std, reference_minmax=reference_minmax)
        self.vit = vit
        self.model = model
        self.patch = int(vit.patch_embed.patch_size[0])
        self.prefix = int(vit.num_prefix_tokens)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Args: image (B, 3, H, W) in [0, 1]. Returns: logits (B, C), feature_maps (B, k, h, w), features (B, k)."""
        x = self.vit.forward_features(self.pre(image))
        tokens = join_tokens(x[:, self.prefix:], x[:, 0])  # the same slicing as Backbone.tokens
        grid = (image.shape[2] // self.patch, image.shape[3] // self.patch)
        model = self.model
        if grid != model.grid:
            model = DinoQPM(adapter=model.adapter, head=model.head, grid=grid)  # shares the weights
        logits, features, maps = model(tokens)
        return logits, maps, features


def export_graph(module: nn.Module, example: Tensor, *, opset: int, dynamic_image_size: bool) -> onnx.ModelProto:
    """Export with the dynamo exporter: dynamic batch always, dynamic H and W (multiples of the patch) on request.

    Args:
        module: `DeployModel` or `UnfoldedModel`, eval mode, on the CPU.
        example: (B >= 2, 3, H, W) example input; a batch of 1 would let the exporter specialise the batch axis.
        opset: ONNX opset (>= 17 for LayerNormalization).
        dynamic_image_size: export H and W as symbolic multiples of the patch size.

    Returns:
        The ONNX model, optimised by the exporter, with input `image` and outputs `logits`, `feature_maps`,
        `features`.
    """
    batch = torch.export.Dim("batch", min=1)
    axes: dict[int, object] = {0: batch}
    if dynamic_image_size:
        patch = int(module.patch)  # type: ignore[arg-type]
        axes[2] = patch * torch.export.Dim("h", min=1, max=1024)
        axes[3] = patch * torch.export.Dim("w", min=1, max=1024)
    # The exporter reports progress on stdout/stderr and warns about its own internals; the CLI prints a summary.
    sink = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                    output_names=list(OUTPUT_NAMES), dynamic_shapes={INPUT_NAME: axes},
                                    verbose=False)
    if program is None:  # only the legacy exporter returns None
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    return program.model_proto


# Ops kept in float32 in an fp16 graph: LayerNorm statistics and softmax overflow in fp16 on ViTs, the more so on
# DINOv2 without registers with its high-norm tokens (Darcet et al., arXiv 2309.16588).
FP16_KEEP_FP32 = ("LayerNormalization", "Softmax", "ReduceMin", "ReduceMax")


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and compute in float16, with float32 inputs/outputs and the `FP16_KEEP_FP32` ops in float32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the model is too large for shape inference" style notices
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        return convert_float_to_float16(proto, keep_io_types=True,
                                        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32))


__all__ = ["DeployModel", "FP16_KEEP_FP32", "INPUT_NAME", "OUTPUT_NAMES", "UnfoldedModel", "export_graph",
           "normalise", "to_fp16"]
