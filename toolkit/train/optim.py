"""Optimiser choice of a training stage: AdamW with a schedule, or the reference's schedule-free AdamW.

`adamw` is torch's AdamW; the stage's `schedule` (cosine to 0, or constant) is applied by the engine.
`schedulefree_adamw` is `schedulefree.AdamWScheduleFree` (Defazio et al., "The Road Less Scheduled",
arXiv 2405.15682) with the library's defaults (betas (0.9, 0.999), no warm-up), as in RobertZimm/DINO-QPM
(docs/method.md#training). It needs no schedule but has two sets of weights: the interpolated point gradients are
taken at (`train()` mode) and the averaged point that is evaluated and saved (`eval()` mode). The loop switches it
with `set_optimizer_mode`: train mode for every training epoch (resumable checkpoints are written then), eval mode
once training ends, so the model a stage evaluates and saves holds the averaged weights, as the reference's does.
BatchNorm statistics are not re-estimated for the averaged weights (neither are the reference's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from toolkit.config import TrainConfig

__all__ = ["make_optimizer", "schedule_free", "set_optimizer_mode"]


def schedule_free(cfg: TrainConfig) -> bool:
    """Whether the stage trains with a schedule-free optimiser (then the engine uses a constant schedule)."""
    return cfg.optimizer == "schedulefree_adamw"


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser over the module's trainable parameters.

    Raises:
        ImportError: `schedulefree_adamw` was asked for but the `schedulefree` package is not installed.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "schedulefree_adamw":
        try:
            import schedulefree
        except ImportError as e:  # a declared dependency; only a hand-made environment lacks it
            raise ImportError("optimizer schedulefree_adamw needs the `schedulefree` package "
                              "(pip install 'schedulefree>=1.4'), or set <stage>.optimizer=adamw") from e
        opt = schedulefree.AdamWScheduleFree(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        opt.train()  # it starts in eval mode and refuses to step there
        return opt
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; one of adamw, schedulefree_adamw")


def _base(optimizer: Any) -> Any:
    """The optimiser inside DeepSpeed's wrappers (they keep it as `.optimizer`)."""
    seen = 0
    while optimizer is not None and not callable(getattr(optimizer, "eval", None)) and seen < 4:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer


def set_optimizer_mode(engine: Any, *, train: bool) -> None:
    """Put a schedule-free optimiser (of an engine, or given directly) in train or eval mode; others: no-op.

    In eval mode the module's parameters are the averaged weights; in train mode the point where gradients are
    taken. Switching twice to the same mode changes nothing.
    """
    opt = _base(getattr(engine, "optimizer", engine))
    if opt is None or not callable(getattr(opt, "eval", None)) or not callable(getattr(opt, "train", None)):
        return
    if not isinstance(opt, torch.optim.Optimizer):
        return
    opt.train() if train else opt.eval()
