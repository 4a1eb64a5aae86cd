"""Atomic file writes: a reader (another rank, a sweep trial, a user's editor) never sees half a file; and what a full
disk (ENOSPC) turns into: a `DiskFullError` naming the path, the space needed or free there, and the fix."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np


class DiskFullError(OSError):
    """No space left on a device: the message names the path, the space needed or free there, and the fix."""

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno 28] ...: 'path'"
        return str(self.args[0]) if self.args else ""


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` is "no space left on device" (ENOSPC) or "disk quota exceeded" (EDQUOT)."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(e: OSError, path: str | Path, what: str, fix: str) -> DiskFullError:
    """The `DiskFullError` for an ENOSPC raised while writing `what` under `path`."""
    where = e.filename or path
    return DiskFullError(f"no space left on the device while writing {what} ({where}; "
                         f"{human_bytes(free_bytes(path))} free there now). {fix}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a failed write() names no file; a full disk's message should
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def jsonable(obj: Any) -> Any:
    """`json.dumps(default=...)` hook for dataclasses, paths and numpy scalars/arrays."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "model_dump"):  # pydantic config sections
        return obj.model_dump()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=jsonable))
