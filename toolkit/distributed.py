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


# (node rank, node count) as each launcher names them: deepspeed, torchrun, then Slurm (one task per rank under srun).
_NODE_ENV = (("CROSS_RANK", "CROSS_SIZE"), ("GROUP_RANK", "GROUP_WORLD_SIZE"), ("SLURM_NODEID", "SLURM_NNODES"))


def node_info() -> tuple[int, int]:
    """(this process's node rank, number of nodes) from the launcher's environment; (0, 1) for a single process."""
    if dist_info().world_size <= 1:
        return 0, 1
    for rank, size in _NODE_ENV:
        if rank in os.environ and size in os.environ:
            return int(os.environ[rank]), int(os.environ[size])
    return 0, 1


def rank_layout(device: torch.device) -> list[dict[str, object]]:
    """Every rank's {"rank", "node", "local_rank", "device"} (a collective: call it on every rank), for the manifest:
    the device index comes from the local rank, so the first rank of every node uses device 0."""
    info = dist_info()
    mine = {"rank": info.rank, "node": node_info()[0], "local_rank": info.local_rank, "device": str(device)}
    if not distributed():
        return [mine]
    out: list[dict[str, object] | None] = [None] * info.world_size
    dist.all_gather_object(out, mine)
    return [x for x in out if x is not None]


def ranks_text(world_size: int) -> str:
    """The ranks part of an engine's description: "2 ranks" on one node, "4 ranks on 2 nodes" on several."""
    nodes = node_info()[1]
    return f"{world_size} ranks" + (f" on {nodes} nodes" if nodes > 1 else "")


def local_world_size() -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE, else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which Slurm and containers narrow), else cpu_count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(cfg: RuntimeConfig) -> int:
    """Set torch's intra-op thread count from runtime.threads (see its comment) and return it."""
    if cfg.threads != "auto":
        threads = cfg.threads
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    else:
        threads = max(1, usable_cores() // local_world_size())
    torch.set_num_threads(threads)
    return threads


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


def shutdown_distributed() -> None:
    """Leave the process group cleanly (a no-op for one process). Left to interpreter exit, the communication
    threads of gloo and DeepSpeed can be torn down mid-flight and abort the process after the work is done."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


# ------------------------------------------------------------------------------ synchronised BatchNorm


class SyncBatchNorm1d(torch.nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are pooled over every rank (the same math as one process seeing the
    global batch).

    torch's `nn.SyncBatchNorm` refuses CPU tensors, so this one is written on the autograd-aware collective
    `torch.distributed.nn.functional.all_reduce` (gloo and NCCL alike); the CPU test then exercises the exact code
    that runs on GPUs. Mean and variance are two passes (sum, then sum of squared deviations), as a single-process
    BatchNorm computes them. The module is a `BatchNorm1d` (same parameters, buffers and state-dict keys), and
    `convert_sync_batchnorm` / `revert_sync_batchnorm` only swap its class, so DeepSpeed's parameter references
    and the checkpoint format are untouched.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C)
        if not (self.training and distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        count = all_reduce(torch.tensor([float(xf.shape[0])], device=x.device)).detach()  # global N
        mean = all_reduce(xf.sum(0)) / count  # (C,)
        var = all_reduce(((xf - mean) ** 2).sum(0)) / count  # biased, as BatchNorm normalises with
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


def convert_sync_batchnorm(module: torch.nn.Module) -> int:
    """Make every BatchNorm1d of `module` synchronise its statistics over the ranks (in place); returns how many.

    A no-op for a single process: one rank's statistics are already the global ones.
    """
    n = 0
    if dist_info().world_size <= 1:
        return n
    for m in module.modules():
        if type(m) is torch.nn.BatchNorm1d:
            m.__class__ = SyncBatchNorm1d
            n += 1
    return n


def revert_sync_batchnorm(module: torch.nn.Module) -> None:
    """Undo `convert_sync_batchnorm` (plain BatchNorm1d again, for evaluation, export and checkpoints)."""
    for m in module.modules():
        if type(m) is SyncBatchNorm1d:
            m.__class__ = torch.nn.BatchNorm1d


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, so one model is evaluated (and reported) everywhere."""
    if not distributed():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


# ------------------------------------------------------------------------------ RNG streams (exact resume)


def rng_state() -> dict[str, object]:
    """Every random stream this process draws from: python, numpy, torch CPU and (when present) CUDA."""
    state: dict[str, object] = {"python": random.getstate(), "numpy": np.random.get_state(),
                                "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, object]) -> None:
    random.setstate(state["python"])  # type: ignore[arg-type]
    np.random.set_state(state["numpy"])  # type: ignore[arg-type]
    torch.set_rng_state(state["torch"])  # type: ignore[arg-type]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])  # type: ignore[arg-type]

