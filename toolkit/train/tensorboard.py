"""Training curves as TensorBoard event files, so `tensorboard --logdir runs/` shows every run's stages.

`epoch_logger(run_dir)` returns an `on_epoch(stage, metrics)` callback that writes each epoch's history entry (loss
terms, train accuracy, seconds) as scalars under run_dir/tensorboard/<stage>/ (one TensorBoard "run" per stage, the
same tags in each, so stages and runs can be overlaid). It writes on rank 0 only and is optional: without
tensorboardX (or torch.utils.tensorboard with the tensorboard package) it returns None and says so once. The same
numbers are in each stage's history.json and drawn in report.html.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.console import Console

EpochCallback = Callable[[str, dict[str, float]], None]
SUBDIR = "tensorboard"


def _summary_writer() -> Any:
    """The SummaryWriter class of tensorboardX, else of torch.utils.tensorboard; None when neither imports."""
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        return SummaryWriter
    except ImportError:
        return None


class EpochLogger:
    """`on_epoch` callback writing one epoch's scalars per call.

    Each call opens a writer on run_dir/tensorboard/<stage>/, writes and closes it (one small event file per epoch,
    suffixed with the epoch): tensorboardX writes asynchronously, and closing is the only way to know the epoch is
    on disk, so a run that is killed or resumed keeps every finished epoch and TensorBoard merges the files."""

    def __init__(self, log_dir: Path, writer_cls: Any) -> None:
        self.log_dir = Path(log_dir)
        self._writer_cls = writer_cls

    def __call__(self, stage: str, metrics: dict[str, float]) -> None:
        step = int(metrics.get("epoch", 0))
        writer = self._writer_cls(str(self.log_dir / stage), filename_suffix=f".epoch{step}")
        try:
            for key, value in metrics.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    writer.add_scalar(key, float(value), step)
        finally:
            writer.close()


def epoch_logger(run_dir: Path, *, is_main: bool, console: Console | None = None) -> EpochLogger | None:
    """The TensorBoard callback for a run directory, or None on ranks other than 0 or without a TensorBoard
    writer package."""
    if not is_main:
        return None
    writer_cls = _summary_writer()
    if writer_cls is None:
        if console is not None:
            console.log("TensorBoard event files skipped: neither tensorboardX nor tensorboard is installed "
                        "(pip install tensorboardX); the curves are still in history.json and report.html")
        return None
    return EpochLogger(Path(run_dir) / SUBDIR, writer_cls)


def chain(*callbacks: EpochCallback | None) -> EpochCallback | None:
    """One callback calling every given one in order (None entries skipped); None when none is given."""
    present = [c for c in callbacks if c is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def call(stage: str, metrics: dict[str, float]) -> None:
        for c in present:
            c(stage, metrics)

    return call
