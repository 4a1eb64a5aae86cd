"""Rank-0 console: rich progress and logs on a terminal, plain timestamped lines otherwise (CI, log files)."""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from toolkit.distributed import dist_info

T = TypeVar("T")


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
