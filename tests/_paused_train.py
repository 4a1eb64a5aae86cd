"""launch/train.py with every rank stopped for good right after one chosen checkpoint: the fault test's entry point.

    PAUSE_AFTER_CHECKPOINT=<stage>:<optimizer step>:<marker> deepspeed ... tests/_paused_train.py --config ...

Each rank of that stage, once `train_model`'s checkpoint at that optimiser step is complete (its rank files written
and the engine's `latest` pointer saved), writes "<marker>.rank<r>" and waits for a signal, so the test kills it at a
point it chose, whatever the machine's speed. It wraps the `fit` that `toolkit.train.trainer` calls; the product has
no pause of its own.

With RESUME_WHEN=<file> as well, each rank pauses instead just before that optimiser step's preemption check (the
`stop` hook of `fit`) and waits only until that file exists: the preemption tests send their signal while every rank
waits there, then create the file.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import launch.train
import toolkit.train.trainer as trainer
from toolkit.distributed import dist_info

STAGE, STEP, MARKER = os.environ["PAUSE_AFTER_CHECKPOINT"].split(":", 2)
GO = os.environ.get("RESUME_WHEN")
_fit = trainer.fit


def _pause(name: str, state: dict[str, Any]) -> None:
    if name == STAGE and state["optimizer_step"] == int(STEP):
        Path(f"{MARKER}.rank{dist_info().rank}").write_text(f"{name} step {STEP}\n")
        while GO is None:  # until the test's SIGKILL (or the launcher taking the job down)
            signal.pause()
        while not Path(GO).exists():  # a file the test writes once its signal was sent
            time.sleep(0.05)


def _paused_fit(*args: Any, name: str, checkpoint: Any = None, stop: Any = None, **kwargs: Any) -> Any:
    def checkpoint_then_pause(engine: Any, state: dict[str, Any], mine: dict[str, Any]) -> None:
        checkpoint(engine, state, mine)
        _pause(name, state)

    def pause_then_stop(engine: Any, state: dict[str, Any], mine: dict[str, Any]) -> None:
        _pause(name, state)
        stop(engine, state, mine)

    if GO is None:  # kill tests: pause after the checkpoint
        return _fit(*args, name=name, checkpoint=checkpoint and checkpoint_then_pause, stop=stop, **kwargs)
    # preemption tests: pause before the step's preemption check (no periodic checkpoint needed)
    return _fit(*args, name=name, checkpoint=checkpoint, stop=stop and pause_then_stop, **kwargs)


trainer.fit = _paused_fit

if __name__ == "__main__":
    sys.exit(launch.train.main())
