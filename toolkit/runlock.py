"""One live job per run directory: `run.lock` holds the owner (pid, host, start time) under an OS file lock.

The OS releases the lock when its process dies, however it dies (kill -9, a node reboot of a local disk), so a lock
is never stale by itself: what a killed job leaves is a `run.lock` whose content still names it. A job that finds
the lock free but the content of another job knows that job ended without cleaning up (it was killed), says so and
takes the directory over: its finished stages are loaded from the cache and `--resume` continues interrupted training.
A job that finds the lock held refuses to start, naming the owner and what to do, so two live jobs never share a run
directory (with a pinned `runtime.run_name`, or the same config started twice). A clean exit empties the file; it
is never deleted, so a job waiting to open it cannot end up locking a file that is no longer the directory's.

The lock is `fcntl.flock`: on network filesystems it is only as good as their flock support (NFSv4 and Lustre with
flock enabled honour it across nodes).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOCK = "run.lock"


class RunDirBusyError(FileExistsError):
    """Another live job holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe_owner(owner: dict[str, Any]) -> str:
    """"pid 123 on host n1, started 2026-01-01T10:00:00+0000" from a lock file's content."""
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"


class RunLock:
    """The lock of one run directory, held from `acquire` until `release` (or the process's death)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def _read(self, fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode(errors="replace").strip()
        try:
            return json.loads(text) if text else None
        except ValueError:  # cut short by a crash while writing it: an owner that is gone
            return {"pid": None, "host": None, "started": None}

    def acquire(self, log: Callable[[str], None]) -> None:
        """Take the lock, or raise `RunDirBusyError` naming the live owner; a dead owner's lock is taken over with a
        log line naming it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._read(fd) or {}
            os.close(fd)
            raise RunDirBusyError(
                f"{self.path.parent} is in use by a running job ({describe_owner(owner)}); nothing was written. Wait "
                f"for it to finish, stop it (kill {owner.get('pid')} on {owner.get('host')}) and rerun with --resume, "
                "or give this job its own directory (another runtime.run_name, or leave it unset)") from None
        try:
            self._take(fd, log)
        except BaseException:  # e.g. a full disk: drop the lock rather than hold it with a stale descriptor
            os.close(fd)
            raise
        self._fd = fd

    def _take(self, fd: int, log: Callable[[str], None]) -> None:
        old = self._read(fd)
        if old is not None:
            host = socket.gethostname()
            gone = (f"pid {old.get('pid')} is not running" if old.get("host") == host and old.get("pid")
                    and not _pid_alive(int(old["pid"])) else "its lock was released by the OS")
            log(f"run directory {self.path.parent} was left by a job that did not finish ({describe_owner(old)}; "
                f"{gone}): taking it over. Its finished stages are reused from the cache; --resume continues its "
                "interrupted training from the last checkpoint")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Empty the file (a clean end) and drop the lock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:  # the directory was removed (a run whose first stage failed): nothing to mark
            pass
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None
