"""Content-hashed stage artefacts: a stage's output directory is named by a hash of everything it depends on.

A key is sha256 over (stage name, config slice, upstream keys, code and library versions). A hit loads, a miss
computes into a temporary directory that is renamed only when complete, so an interrupted stage is never reused
(unlike the reference code's "file exists, so skip"; docs/method.md#differences). Every artefact directory holds a
`manifest.json`: stage, key, config slice, upstream keys, versions, metrics and wall time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from toolkit import __version__
from toolkit.distributed import barrier, broadcast_object, dist_info, distributed
from toolkit.files import jsonable

MANIFEST = "manifest.json"
# Directory -> whether this process's last get_or_run for it loaded (True) or built (False) it; run manifests
# report it per stage.
_HITS: dict[str, bool] = {}


def was_cached(directory: Path) -> bool | None:
    """Whether this process loaded `directory` from the cache (None if it never asked for it)."""
    return _HITS.get(str(directory))
# Bump when a stage's maths changes in a way that invalidates artefacts made by older code.
CODE_VERSION = "1"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics the artefacts depend on."""
    import timm
    import torch

    return {"toolkit": __version__, "code": CODE_VERSION, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__}


def content_key(stage: str, config: Any, upstream: dict[str, str] | None = None, extra: Any = None) -> str:
    """Stable hex key of a stage's inputs (config slice, upstream artefact keys, anything else it reads)."""
    payload = {"stage": stage, "config": config, "upstream": upstream or {}, "extra": extra,
               "versions": library_versions()}
    blob = json.dumps(payload, sort_keys=True, default=jsonable).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


@dataclass
class Manifest:
    """What an artefact directory holds and how it was made."""

    stage: str
    key: str
    config: Any
    upstream: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def write(self, directory: Path) -> None:
        text = json.dumps(dataclasses.asdict(self), indent=2, default=jsonable)
        (directory / MANIFEST).write_text(text)

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        return cls(**json.loads((directory / MANIFEST).read_text()))


def get_or_run(
    root: Path,
    stage: str,
    key: str,
    build: Callable[[Path], dict[str, Any]],
    *,
    config: Any,
    upstream: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, Manifest, bool]:
    """Return the artefact directory for `key`, building it with `build(tmp_dir) -> metrics` on a miss.

    Returns:
        (directory, manifest, hit): `hit` is True when nothing was computed.
    """
    final = Path(root) / stage / key
    if distributed():
        out = _get_or_run_ranks(final, stage, key, build, config=config, upstream=upstream, log=log)
    else:
        out = _get_or_run_local(final, stage, key, build, config=config, upstream=upstream, log=log)
    _HITS[str(final)] = out[2]
    return out


def _get_or_run_local(
    final: Path, stage: str, key: str, build: Callable[[Path], dict[str, Any]], *, config: Any,
    upstream: dict[str, str] | None, log: Callable[[str], None] | None,
) -> tuple[Path, Manifest, bool]:
    if (final / MANIFEST).is_file():
        if log:
            log(f"{stage}: cached ({final})")
        return final, Manifest.read(final), True
    final.parent.mkdir(parents=True, exist_ok=True)
    # One builder per key across processes (concurrent sweep trials): the others wait, then load.
    with FileLock(final.parent / f".{key}.lock"):
        if (final / MANIFEST).is_file():
            if log:
                log(f"{stage}: built by another process ({final})")
            return final, Manifest.read(final), True
        tmp = _new_tmp(final)
        t0 = time.perf_counter()
        try:
            metrics = build(tmp) or {}
            manifest = _publish(tmp, final, stage, key, config, upstream, metrics, t0)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if log:
        log(f"{stage}: built in {manifest.seconds:.1f}s ({final})")
    return final, manifest, False


def _new_tmp(final: Path) -> Path:
    # Temp name in the same folder so the rename is atomic; the manifest is written last, so a directory without
    # one is incomplete by construction and is never loaded.
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, final: Path, stage: str, key: str, config: Any, upstream: dict[str, str] | None,
             metrics: dict[str, Any], t0: float) -> Manifest:
    manifest = Manifest(stage=stage, key=key, config=config, upstream=upstream or {}, metrics=metrics,
                        seconds=round(time.perf_counter() - t0, 3))
    manifest.write(tmp)
    if final.exists():  # a stale, incomplete directory left by a crash
        shutil.rmtree(final)
    os.replace(tmp, final)
    return manifest


def _get_or_run_ranks(
    final: Path, stage: str, key: str, build: Callable[[Path], dict[str, Any]], *, config: Any,
    upstream: dict[str, str] | None, log: Callable[[str], None] | None,
) -> tuple[Path, Manifest, bool]:
    """Distributed variant: every rank runs `build` together (training needs all ranks), in rank 0's temp
    directory on the shared filesystem; `build` writes files on rank 0 only; rank 0 publishes."""
    info = dist_info()
    hit = broadcast_object((final / MANIFEST).is_file() if info.is_main else None)
    if hit:
        if log:
            log(f"{stage}: cached ({final})")
        return final, Manifest.read(final), True
    tmp = broadcast_object(_new_tmp(final) if info.is_main else None)
    t0 = time.perf_counter()
    metrics = build(tmp) or {}
    barrier()
    if info.is_main:
        _publish(tmp, final, stage, key, config, upstream, metrics, t0)
    barrier()
    manifest = Manifest.read(final)
    if log:
        log(f"{stage}: built in {manifest.seconds:.1f}s ({final})")
    return final, manifest, False
