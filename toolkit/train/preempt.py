"""Preemption: a scheduler's stop signal becomes a resume checkpoint and an exit status that says "requeue me".

Slurm and Kubernetes send SIGTERM some time before they kill a job, and Slurm's `--signal=USR1@<seconds>` sends
SIGUSR1 ahead of the time limit. Once `install` ran (`launch/train.py` does, with `runtime.preempt_grace_s`), either
signal only sets a flag in the rank that receives it. After every optimiser step the ranks agree on it (one
all-reduce of one number, so a signal that reached only some ranks stops all of them at the same step), every rank
writes its part of a resume checkpoint, and the stage raises `Preempted`; `launch/train.py` then exits with
`PREEMPTED_EXIT` (75, EX_TEMPFAIL of sysexits.h: "try again later"), which a requeue script tells apart from a
failure (1 or 2) and from a kill (137 = 128 + SIGKILL, 143 = 128 + SIGTERM). `--resume` continues exactly from that
checkpoint.

A signal that arrives outside a training step (token extraction, the QP, evaluation) stops the run at the next
optimiser step. If no checkpoint was written within `runtime.preempt_grace_s` seconds of the signal (no training
step followed, or a step takes longer), the process exits with the same status anyway: `--resume` then continues
from the last complete checkpoint (`runtime.checkpoint_every`) or redoes the unfinished stage, and every finished
stage is a cached artefact.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

import torch
import torch.distributed as dist

from toolkit.distributed import distributed

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: preempted, a resume checkpoint is written; requeue and run with --resume
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):  # noqa: N818 (not an error: the run stopped as asked)
    """A training stage stopped on a preemption signal after writing its resume checkpoint."""


class _Watch:
    """This process's preemption state: the installed handlers, the signal received and when."""

    def __init__(self) -> None:
        self.grace_s = 60.0
        self.signum: int | None = None
        self.received_at = 0.0
        self.previous: dict[int, object] = {}
        self.timer: threading.Timer | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # a launcher may forward the signal a second time
            return
        self.signum, self.received_at = signum, time.monotonic()
        self.timer = threading.Timer(self.grace_s, self.expire, args=(signum,))
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        """Forget a received signal and stop its grace timer (a process that goes on, e.g. a test, must not exit
        when the timer of a signal it already handled runs out)."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.signum = None, None

    def expire(self, signum: int) -> None:
        sys.stderr.write(f"preempted: no resume checkpoint within runtime.preempt_grace_s={self.grace_s:g} s of "
                         f"{signal.Signals(signum).name}; exiting with status {PREEMPTED_EXIT}. --resume "
                         "continues from the last complete checkpoint (runtime.checkpoint_every) or redoes the "
                         "unfinished stage.\n")
        sys.stderr.flush()
        os._exit(PREEMPTED_EXIT)


_WATCH = _Watch()


def install(grace_s: float) -> bool:
    """Catch SIGTERM and SIGUSR1 in this process (the main thread only; returns False elsewhere, e.g. in a Ray
    worker thread, and the signals keep their previous handling)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _WATCH.grace_s = grace_s
    for s in SIGNALS:
        _WATCH.previous.setdefault(s, signal.signal(s, _WATCH.on_signal))
    return True


def uninstall() -> None:
    """Restore the handlers `install` replaced and forget a received signal."""
    for s, handler in _WATCH.previous.items():
        signal.signal(s, handler)  # type: ignore[arg-type]
    _WATCH.previous.clear()
    _WATCH.cancel()


def installed() -> bool:
    return bool(_WATCH.previous)


def signalled() -> str | None:
    """The name of the preemption signal this process received, or None."""
    return signal.Signals(_WATCH.signum).name if _WATCH.signum is not None else None


def seconds_since_signal() -> float:
    return time.monotonic() - _WATCH.received_at if _WATCH.signum is not None else 0.0


def agreed(device: torch.device) -> bool:
    """Whether any rank received a preemption signal: the same answer on every rank (every rank must call it at the
    same point, after each optimiser step). `device` is where the backend reduces (CUDA for NCCL)."""
    flag = _WATCH.signum is not None
    if not distributed():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
