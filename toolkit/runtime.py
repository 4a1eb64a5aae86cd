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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------ logging


class Console:
    """Rank-0 console: rich when attached to a terminal, plain timestamped lines otherwise; other ranks stay quiet
    except for warnings."""

    def __init__(self, *, enabled: bool = True, log_file: Path | None = None) -> None:
        self.info_ = dist_info()
        self.enabled = enabled and self.info_.is_main
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
        """Iterate with a progress bar (rich on a TTY) or a few plain lines (every ~25 %)."""
        if not self.enabled:
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
        step = max(1, (total or 0) // 4)
        for i, x in enumerate(items, 1):
            yield x
            if total and (i % step == 0 or i == total):
                print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {desc}: {i}/{total}", flush=True)


# ------------------------------------------------------------------------------------------ engines


class Engine(Protocol):
    """What the training loop needs from DeepSpeed or plain torch."""

    module: nn.Module
    device: torch.device
    autocast_dtype: torch.dtype | None

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

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
