"""Training: the engine interface (plain torch, DeepSpeed), the loop, the losses, and `train_model`.

    engine.py      `Engine` protocol, `TorchEngine` (one process or DDP), optimiser and schedule factories
    _deepspeed.py  `DeepSpeedEngine`: the only module that imports DeepSpeed
    loop.py        `fit`, `train_epoch`, `evaluate` (every sample once, over all ranks), `store_maps`
    losses.py      cross-entropy, feature-diversity loss, L1 sparsity terms
    trainer.py     `TrainContext`, `train_model` (resumable), the engine factory
"""

from toolkit.train.engine import Engine, TorchEngine, make_optimizer, make_scheduler
from toolkit.train.loop import (
    DivergedError,
    Outputs,
    evaluate,
    fit,
    make_loader,
    micro_batch_size,
    reads_patches,
    store_maps,
    train_epoch,
)
from toolkit.train.trainer import (
    EngineFactory,
    Split,
    TrainContext,
    drop_work_dir,
    make_engine_factory,
    scores,
    split_keys,
    split_outputs,
    train_model,
    work_dir,
)

__all__ = ["DivergedError", "Engine", "EngineFactory", "Outputs", "Split", "TorchEngine", "TrainContext",
           "drop_work_dir", "evaluate", "fit", "make_engine_factory", "make_loader", "make_optimizer", "make_scheduler",
           "micro_batch_size", "reads_patches", "scores", "split_keys", "split_outputs", "store_maps", "train_epoch",
           "train_model", "work_dir"]
