"""Process state of a (possibly distributed) run: rank and world size, device and precision, seeding, and the
few collectives the stages need (barrier, broadcast). Every function is a no-op for a single process, so the same
code runs under `python`, `torchrun` and the `deepspeed` launcher.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from toolkit.config import ConfigError, RuntimeConfig

T = TypeVar("T")

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
