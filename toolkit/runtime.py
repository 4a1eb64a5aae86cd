"""Process runtime: seeding, device, rank-aware logging and progress, and the training `Engine` interface.

The training loop only talks to an `Engine` (backward, step, save, load). `TorchEngine` runs on plain torch (one
process, or DDP under torchrun); `toolkit._deepspeed` provides the DeepSpeed engine and is the only module that
imports DeepSpeed.
"""

from __future__ import annotations

import datetime
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from toolkit.config import ConfigError, RuntimeConfig, TrainConfig

T = TypeVar("T")


# ------------------------------------------------------------------------------------------ process state


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size of this process (from torch.distributed when initialised, else the launcher's env)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                        dist.get_backend())
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)), "none")


def resolve_device(cfg: RuntimeConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'runtime.device': cuda was asked for but no CUDA device is visible; "
                          "use runtime.device=cpu or auto")
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_precision(cfg: RuntimeConfig, device: torch.device) -> str:
    """bf16 on GPU, fp32 on CPU unless set explicitly."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device.type == "cuda" else "fp32"


def init_distributed(cfg: RuntimeConfig) -> DistInfo:
    """Join the process group the launcher (deepspeed, torchrun) set up; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or dist.is_initialized():
        return dist_info()
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("config key 'runtime.backend': nccl needs CUDA devices; on CPU use runtime.backend=gloo "
                          "(or auto)")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # A timeout on collectives makes the surviving ranks fail instead of hanging when one rank dies.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.collective_timeout_s))
    return dist_info()


def deepspeed_requested(cfg: RuntimeConfig) -> bool:
    """True when the DeepSpeed engine should train: asked for, or auto under the deepspeed launcher."""
    if cfg.engine != "auto":
        return cfg.engine == "deepspeed"
    return "CROSS_RANK" in os.environ  # set by the deepspeed launcher, not by torchrun


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if distributed():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (identity for a single process)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------ logging


class Console:
    """Rank-0 console: rich when attached to a terminal, plain timestamped lines otherwise; other ranks stay quiet
    except for warnings."""

    def __init__(self, *, enabled: bool = True, progress: bool = True, log_file: Path | None = None) -> None:
        self.info_ = dist_info()
        self.enabled = enabled and self.info_.is_main
        self.show_progress = progress
        self.tty = sys.stdout.isatty()
        self.log_file = log_file
        self._rich = None
        if self.enabled and self.tty:
            from rich.console import Console as RichConsole

            self._rich = RichConsole()

    def log(self, msg: str) -> None:
        if self.log_file is not None and self.info_.is_main:
            with open(self.log_file, "a") as f:
                f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {msg}\n")
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.log(msg)
        else:
            print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)

    def warn(self, msg: str) -> None:
        print(f"[rank {self.info_.rank}] WARNING: {msg}", file=sys.stderr, flush=True)

    def progress(self, items: Iterable[T], *, total: int | None, desc: str) -> Iterator[T]:
        """Iterate with a progress bar (rich on a TTY) or plain lines at most every 10 s."""
        if not (self.enabled and self.show_progress):
            yield from items
            return
        if self._rich is not None:
            from rich.progress import Progress

            with Progress(console=self._rich, transient=True) as bar:
                task = bar.add_task(desc, total=total)
                for x in items:
                    yield x
                    bar.advance(task)
            return
        # Plain lines (logs, CI): at most one every 10 s, so short loops stay silent and long ones show life.
        t0 = last = time.monotonic()
        for i, x in enumerate(items, 1):
            yield x
            now = time.monotonic()
            if now - last >= 10:
                last = now
                print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {desc}: {i}/{total or '?'} "
                      f"({i / (now - t0):.1f}/s)", flush=True)


# ------------------------------------------------------------------------------------------ engines


class Engine(Protocol):
    """What the training loop needs from DeepSpeed or plain torch."""

    module: nn.Module
    device: torch.device
    autocast_dtype: torch.dtype | None

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def save(self, directory: Path, client_state: dict[str, Any]) -> None: ...

    def load(self, directory: Path) -> dict[str, Any]: ...


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class TorchEngine:
    """Plain-torch engine: AdamW + schedule, gradient accumulation, DDP when several processes run."""

    def __init__(self, *, module: nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device,
                 grad_accum: int = 1, precision: str = "fp32") -> None:
        module.to(device)
        self.device = device
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.raw = module
        self.module = module
        if dist_info().world_size > 1:
            self.module = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = make_optimizer(module, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, total_steps)
        self.grad_accum = grad_accum
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.grad_accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Write a resumable checkpoint; `latest` is written last, so a half-written one is never loaded."""
        directory.mkdir(parents=True, exist_ok=True)
        if dist_info().is_main:
            tmp = directory / "engine.pt.tmp"
            torch.save({"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "micro": self._micro, "client": client_state}, tmp)
            os.replace(tmp, directory / "engine.pt")
            (directory / "latest").write_text("engine.pt\n")
        barrier()

    def load(self, directory: Path) -> dict[str, Any]:
        # Our own file (model and optimizer tensors, plain dicts): weights_only keeps pickle code out.
        state = torch.load(directory / "engine.pt", map_location=self.device, weights_only=True)
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._micro = state["micro"]
        return state["client"]
