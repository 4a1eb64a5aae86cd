"""The training `Engine` interface and its plain-torch implementation, with the optimiser and schedule factories.

The training loop only talks to an `Engine` (backward, step, save, load). `TorchEngine` runs on plain torch (one
process, or DDP under torchrun); `toolkit.train._deepspeed` provides the DeepSpeed engine and is the only module
that imports DeepSpeed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from toolkit.config import TrainConfig
from toolkit.distributed import barrier, dist_info, ranks_text
from toolkit.files import atomic_write_bytes
from toolkit.train.optim import make_optimizer as _make_optimizer
from toolkit.train.optim import schedule_free


class Engine(Protocol):
    """What the training loop needs from DeepSpeed or plain torch.

    The loop owns the accumulation boundaries (so the last, partial group of an epoch is stepped at the epoch's
    end): `backward(loss, group=r, boundary=b)` is called once per micro-step, where `r` is the number of
    micro-steps of the current group (the loss is divided by `r`, so a partial group averages its own micro-batches)
    and `b` is True on its last micro-step; `step()` follows every backward and updates the weights (and the
    schedule) only at a boundary.
    """

    module: nn.Module
    device: torch.device
    autocast_dtype: torch.dtype | None

    def backward(self, loss: torch.Tensor, *, group: int, boundary: bool) -> None: ...

    def step(self) -> None: ...

    def save(self, directory: Path, client_state: dict[str, Any]) -> None: ...

    def load(self, directory: Path) -> dict[str, Any]: ...

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained module's weights in fp32 (the optimiser's master copy under bf16), full on every rank."""
        ...

    def describe(self) -> str:
        """Which engine runs, e.g. "deepspeed (ZeRO stage 0, bf16)", "ddp (2 ranks, fp32)", "one process (fp32)"."""
        ...


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or schedule-free AdamW over the trainable parameters (`cfg.optimizer`; toolkit.train.optim)."""
    return _make_optimizer(module, cfg)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    if cfg.schedule == "cosine" and not schedule_free(cfg):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class TorchEngine:
    """Plain-torch engine: AdamW + schedule, loop-driven gradient accumulation, DDP when several processes run."""

    def __init__(self, *, module: nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device,
                 grad_accum: int = 1, precision: str = "fp32") -> None:
        module.to(device)
        self.device = device
        self.precision = precision
        # Parameters stay fp32 (autocast computes in bf16), so the weights are their own master copy.
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.raw = module
        self.module = module
        if dist_info().world_size > 1:
            self.module = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = make_optimizer(module, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, total_steps)
        self.grad_accum = grad_accum
        self.optimizer_steps = 0
        self._boundary = True

    def describe(self) -> str:
        world = dist_info().world_size
        return f"ddp ({ranks_text(world)}, {self.precision})" if world > 1 else f"one process ({self.precision})"

    def backward(self, loss: torch.Tensor, *, group: int = 1, boundary: bool = True) -> None:
        self._boundary = boundary
        (loss / group).backward()

    def step(self) -> None:
        if not self._boundary:
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.optimizer_steps += 1

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.raw.state_dict().items()}

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Write a resumable checkpoint; `latest` is written last, so a half-written one is never loaded."""
        directory.mkdir(parents=True, exist_ok=True)
        if dist_info().is_main:
            buf = io.BytesIO()
            torch.save({"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "optimizer_steps": self.optimizer_steps,
                        "client": client_state}, buf)
            atomic_write_bytes(directory / "engine.pt", buf.getvalue())
            atomic_write_bytes(directory / "latest", b"engine.pt\n")
        barrier()

    def load(self, directory: Path) -> dict[str, Any]:
        # Our own file (model and optimizer tensors, plain dicts): weights_only keeps pickle code out.
        state = torch.load(directory / "engine.pt", map_location=self.device, weights_only=True)
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        return state["client"]
