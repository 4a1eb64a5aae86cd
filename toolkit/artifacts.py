"""Content-hashed stage artefacts: a stage's output directory is named by a hash of everything it depends on.

A key is sha256 over (stage name, config slice, upstream keys, the fingerprint of the toolkit code the stage runs
(`toolkit.fingerprint`: its module and every toolkit module it imports, so a loss change rebuilds the training
stages and keeps the token stores), library versions). A hit loads, a miss computes into a temporary directory that
is renamed only when complete, so an interrupted stage is never reused (unlike the reference code's "file exists, so
skip"; docs/method.md#differences). Every artefact directory holds a `manifest.json`: stage, key, config slice,
upstream keys, versions, the code fingerprint with the hash of each module it covers (two manifests of a stage show
which module made it rebuild), metrics, wall time, and what each file holds (size, .npy dtype and shape, sha256 of
small files), which every load checks.
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
from filelock import FileLock, Timeout

from toolkit import __version__
from toolkit.distributed import barrier, broadcast_object, dist_info
from toolkit.files import DiskFullError, atomic_write_text, disk_full, is_disk_full, jsonable
from toolkit.fingerprint import is_stage, stage_fingerprint

MANIFEST = "manifest.json"
# Directory -> whether this process's last get_or_run for it loaded (True) or built (False) it; run manifests
# report it per stage.
_HITS: dict[str, bool] = {}


def was_cached(directory: Path) -> bool | None:
    """Whether this process loaded `directory` from the cache (None if it never asked for it)."""
    return _HITS.get(str(directory))


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics the artefacts depend on."""
    import timm
    import torch

    return {"toolkit": __version__, "torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__}


def content_key(stage: str, config: Any, upstream: dict[str, str] | None = None, extra: Any = None) -> str:
    """Stable hex key of a stage's inputs (config slice, upstream artefact keys, anything else it reads), its code
    (the fingerprint of toolkit/stages/<stage>.py and the toolkit modules it imports) and library versions.

    Raises:
        ValueError: `stage` has no module toolkit/stages/<stage>.py.
    """
    payload = {"stage": stage, "config": config, "upstream": upstream or {}, "extra": extra,
               "code": stage_fingerprint(stage).digest, "versions": library_versions()}
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
    code: dict[str, Any] | None = None  # fingerprint and per-module hashes (toolkit.fingerprint); None: not a stage
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    files: dict[str, dict[str, Any]] | None = None  # relative path -> bytes (+ dtype/shape for .npy, sha256 if small)

    def write(self, directory: Path) -> None:
        text = json.dumps(dataclasses.asdict(self), indent=2, default=jsonable)
        atomic_write_text(directory / MANIFEST, text)

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        return cls(**json.loads((directory / MANIFEST).read_text()))


# Files up to this size get a sha256 in the manifest (cheap to hash on every load); larger ones are checked by size
# and, for .npy, by their header (dtype, shape).
CHECKSUM_MAX_BYTES = 1 << 20


class DamagedArtifactError(OSError):
    """An artefact directory does not hold what its manifest promises (a file missing, cut short or changed)."""


def describe_files(directory: Path) -> dict[str, dict[str, Any]]:
    """What `directory` holds, for its manifest: per file (relative path) its size, the dtype and shape of .npy
    arrays, and a sha256 of files up to CHECKSUM_MAX_BYTES."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST:
            continue
        entry: dict[str, Any] = {"bytes": path.stat().st_size}
        if path.suffix == ".npy":
            try:
                dtype, shape = _npy_header(path)
                entry.update(dtype=dtype, shape=list(shape))
            except (ValueError, OSError, EOFError):  # not an array after all: size and checksum only
                pass
        if entry["bytes"] <= CHECKSUM_MAX_BYTES:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        out[rel] = entry
    return out


def _npy_header(path: Path) -> tuple[str, tuple[int, ...]]:
    with path.open("rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return dtype.str, tuple(shape)


def artifact_problems(directory: Path, manifest: Manifest | None = None) -> list[str]:
    """What is wrong with a published artefact (empty when it holds what its manifest promises).

    Artefacts written before manifests listed their files are not checked (nothing was promised).
    """
    try:
        manifest = manifest or Manifest.read(directory)
    except (OSError, ValueError, TypeError) as e:
        return [f"{MANIFEST} unreadable ({e})"]
    problems = []
    for rel, want in (manifest.files or {}).items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{rel} has {size} bytes, the manifest promises {want['bytes']}")
            continue
        if "shape" in want:
            try:
                dtype, shape = _npy_header(path)
            except (ValueError, OSError, EOFError) as e:
                problems.append(f"{rel} has no readable .npy header ({e})")
                continue
            if list(shape) != want["shape"] or dtype != want["dtype"]:
                problems.append(f"{rel} holds {dtype} {list(shape)}, the manifest promises {want['dtype']} "
                                f"{want['shape']}")
                continue
        if "sha256" in want and hashlib.sha256(path.read_bytes()).hexdigest() != want["sha256"]:
            problems.append(f"{rel} does not match its sha256 in the manifest")
    return problems


def check_artifact(directory: Path) -> None:
    """Raise `DamagedArtifactError` naming the directory, the damage and the fix, unless it is intact."""
    problems = artifact_problems(directory)
    if problems:
        raise DamagedArtifactError(f"artefact {directory} is damaged: {'; '.join(problems)}. Delete that directory "
                                   "and rerun launch/train.py with the same config: it is rebuilt")


def get_or_run(
    root: Path,
    stage: str,
    key: str,
    build: Callable[[Path], dict[str, Any]],
    *,
    config: Any,
    upstream: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[Path, Manifest, bool]:
    """Return the artefact directory for `key`, building it with `build(tmp_dir) -> metrics` on a miss.

    One builder per key, whatever the world size: the (main) process holds a file lock next to the artefact while
    it checks and builds, so concurrent sweep trials build a key once and the others load it. A published
    artefact is never deleted or replaced. Every load checks the files against the manifest (sizes, .npy shapes,
    checksums of small files); a damaged artefact is moved aside to `.damaged-<key>-*` with a warning that names it,
    and rebuilt. Temporary directories of builders that were killed are removed by the next builder of the key.

    Under several ranks, every rank runs `build` (training needs all ranks) in rank 0's temporary directory on the
    shared filesystem; `build` writes files on rank 0 only; rank 0 publishes.

    Returns:
        (directory, manifest, hit): `hit` is True when nothing was computed.
    """
    final = Path(root) / stage / key
    final.parent.mkdir(parents=True, exist_ok=True)
    if warn is None:
        warn = (lambda msg: log(f"WARNING: {msg}")) if log else (lambda msg: print(f"WARNING: {msg}", flush=True))
    main = dist_info().is_main
    lock = FileLock(final.parent / f".{key}.lock") if main else None
    waited = False
    if lock is not None:
        try:
            lock.acquire(timeout=0)
        except Timeout:  # another process is building this key: wait for it, then load what it published
            waited = True
            lock.acquire()
    try:
        hit = _usable(final, stage, warn) if main else None
        hit, waited = broadcast_object((hit, waited))
        if hit:
            if log:
                log(f"{stage}: built by another process ({final})" if waited else f"{stage}: cached ({final})")
            _HITS[str(final)] = True
            return final, Manifest.read(final), True
        tmp = _new_tmp(final) if main else None
        tmp = broadcast_object(tmp)
        assert tmp is not None
        t0 = time.perf_counter()
        try:
            metrics = build(tmp) or {}
            barrier()
            if main:
                _publish(tmp, final, stage, key, config, upstream, metrics, t0)
        except BaseException as e:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e) and not isinstance(e, DiskFullError):
                assert isinstance(e, OSError)
                raise disk_full(e, final.parent, f"the {stage} artefact or its checkpoints",
                                "The partial artefact was removed and nothing was published; free space (or point "
                                "cache.root at a bigger disk) and rerun the same command (with --resume, training "
                                "continues from its last checkpoint)") from e
            raise
        barrier()
    finally:
        if lock is not None:
            lock.release()
    manifest = Manifest.read(final)
    if log:
        log(f"{stage}: built in {manifest.seconds:.1f}s ({final})")
    _HITS[str(final)] = False
    return final, manifest, False


def _usable(final: Path, stage: str, warn: Callable[[str], None]) -> bool:
    """Whether `final` is a complete, intact artefact (call with the key's lock held). A damaged one is moved aside
    (kept for inspection, never deleted); an incomplete one (no manifest: a crash before publishing) is removed."""
    for stale in final.parent.glob(f".tmp-{final.name}-*"):  # builders of this key that were killed
        shutil.rmtree(stale, ignore_errors=True)
    if not final.exists():
        return False
    if not (final / MANIFEST).is_file():
        shutil.rmtree(final, ignore_errors=True)
        return False
    problems = artifact_problems(final)
    if not problems:
        return True
    aside = final.parent / f".damaged-{final.name}-{uuid.uuid4().hex[:8]}"
    os.replace(final, aside)
    warn(f"{stage} artefact {final} is damaged ({'; '.join(problems)}); rebuilding it. The damaged copy was moved "
         f"to {aside} (delete it when done looking)")
    return False


def _new_tmp(final: Path) -> Path:
    # Temp name in the same folder so the rename is atomic; the manifest is written last, so a directory without
    # one is incomplete by construction and is never loaded.
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, final: Path, stage: str, key: str, config: Any, upstream: dict[str, str] | None,
             metrics: dict[str, Any], t0: float) -> Manifest:
    code = stage_fingerprint(stage).to_json() if is_stage(stage) else None
    manifest = Manifest(stage=stage, key=key, config=config, upstream=upstream or {}, code=code, metrics=metrics,
                        seconds=round(time.perf_counter() - t0, 3), files=describe_files(tmp))
    manifest.write(tmp)
    if (final / MANIFEST).is_file():  # never replace a published artefact (only possible without the lock)
        shutil.rmtree(tmp, ignore_errors=True)
        return Manifest.read(final)
    if final.exists():  # a stale, incomplete directory left by a crash
        shutil.rmtree(final)
    os.replace(tmp, final)
    return manifest
