"""The DeepSpeed engine behind the `Engine` interface; the only module that imports DeepSpeed.

The frozen backbone never enters the engine (DeepSpeed has edge cases with frozen parameters); only the adapter and
head are trained. ZeRO stage 0 (DDP-like) is the default because the trained model is small; 1 and 2 are selectable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.config import ConfigError, RuntimeConfig, TrainConfig
from toolkit.distributed import barrier, dist_info, ranks_text
from toolkit.train.engine import make_optimizer, make_scheduler

# Fields that always come from our config; a template that sets them to something else is an error.
FILLED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# The template used when runtime.deepspeed_config is null, shipped in the package; copy it to start your own.
DEFAULT_TEMPLATE = Path(__file__).with_name("ds_config.json")


def deepspeed_config(cfg: TrainConfig, runtime: RuntimeConfig, *, precision: str) -> dict[str, Any]:
    """The DeepSpeed config: the template (runtime.deepspeed_config, else `DEFAULT_TEMPLATE`) with batch, ZeRO and
    bf16 filled from ours."""
    path = Path(runtime.deepspeed_config) if runtime.deepspeed_config else DEFAULT_TEMPLATE
    if not path.is_file():
        raise ConfigError(f"config key 'runtime.deepspeed_config': {path} not found")
    template: dict[str, Any] = json.loads(path.read_text())
    world = dist_info().world_size
    micro = cfg.batch_size // (world * runtime.grad_accum)
    filled = {"train_batch_size": cfg.batch_size, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": runtime.grad_accum}
    for k in FILLED:
        if k in template and template[k] != filled[k]:
            raise ConfigError(f"{path}: '{k}'={template[k]} disagrees with the run config "
                              f"({filled[k]}); remove it from the JSON, it is filled from our config")
    out = {**template, **filled}
    out["zero_optimization"] = {**template.get("zero_optimization", {}), "stage": runtime.zero_stage}
    out["bf16"] = {**template.get("bf16", {}), "enabled": precision == "bf16"}
    return out


class DeepSpeedEngine:
    """`deepspeed.initialize` around the trainable module with our AdamW and LR schedule (client objects)."""

    def __init__(self, *, module: nn.Module, cfg: TrainConfig, runtime: RuntimeConfig, total_steps: int,
                 device: torch.device, precision: str) -> None:
        import deepspeed

        module.to(device)
        self.device = device
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.raw = module
        self.config = deepspeed_config(cfg, runtime, precision=precision)
        optimizer = make_optimizer(module, cfg)
        # The schedule counts optimizer steps; DeepSpeed steps it once per accumulation boundary.
        scheduler = make_scheduler(optimizer, cfg, total_steps)
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.config,
            model_parameters=[p for p in module.parameters() if p.requires_grad])

    def describe(self) -> str:
        return (f"deepspeed (ZeRO stage {self.config['zero_optimization']['stage']}, "
                f"{ranks_text(dist_info().world_size)}, {'bf16' if self.autocast_dtype is not None else 'fp32'})")

    def backward(self, loss: torch.Tensor, *, group: int = 1, boundary: bool = True) -> None:
        # The loop owns the boundaries (a partial last group is stepped at the epoch's end); DeepSpeed's own
        # counter would carry it into the next epoch. The gradient reduction happens on the boundary backward.
        self.module.set_gradient_accumulation_boundary(boundary)
        self.module.backward(loss / group, scale_wrt_gas=False)

    def step(self) -> None:
        self.module.step()  # updates weights and schedule only at the boundary set in backward

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 weights: under bf16 the optimiser's fp32 master copy, not the bf16 parameters the forward pass used.

        ZeRO 1/2 (and DeepSpeed's BF16_Optimizer) expose it through `safe_get_full_fp32_param` (full on every rank);
        ZeRO 0 with bf16 wraps the optimiser in DeepSpeed's fp16/bf16 optimiser, whose master copy is its
        `fp32_groups` (or `fp32_groups_flat`) paired with `fp16_groups`. Without bf16 the parameters are the
        masters.
        """
        from deepspeed.utils import safe_get_full_fp32_param
        from torch._utils import _unflatten_dense_tensors

        masters: dict[int, torch.Tensor] = {}
        opt = self.optimizer
        low = getattr(opt, "fp16_groups", None)
        if low is not None and hasattr(opt, "fp32_groups"):
            for lp, hp in zip(low, opt.fp32_groups):
                masters.update({id(p): h for p, h in zip(lp, hp)})
        elif low is not None and hasattr(opt, "fp32_groups_flat"):
            for lp, flat in zip(low, opt.fp32_groups_flat):
                masters.update({id(p): h for p, h in zip(lp, _unflatten_dense_tensors(flat, lp))})
        out: dict[str, torch.Tensor] = {}
        for name, param in self.raw.named_parameters():
            full = masters.get(id(param))
            if full is None and param.requires_grad and self.autocast_dtype is not None:
                full = safe_get_full_fp32_param(param)
            if full is None and param.dtype != torch.float32 and param.requires_grad:
                raise RuntimeError(f"no fp32 master weight found for {name} ({param.dtype}) in "
                                   f"{type(opt).__name__}; saving it would store rounded weights")
            out[name] = (full if full is not None else param.detach()).float().clone()
        for name, buf in self.raw.named_buffers():
            out[name] = buf.detach().float().clone() if buf.is_floating_point() else buf.detach().clone()
        return {k: out[k] for k in self.raw.state_dict() if k in out}

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        """DeepSpeed checkpoint (every rank takes part); its `latest` file is written only once a tag is complete,
        so a half-written checkpoint is never loaded."""
        tag = f"epoch{client_state['epoch']}-step{client_state['step']}"
        self.module.save_checkpoint(str(directory), tag=tag, client_state={"client": client_state})
        barrier()

    def load(self, directory: Path) -> dict[str, Any]:
        path, state = self.module.load_checkpoint(str(directory))
        if path is None:
            raise FileNotFoundError(f"no complete DeepSpeed checkpoint in {directory}")
        return state["client"]
