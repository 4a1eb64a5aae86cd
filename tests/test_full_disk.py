"""A full disk, on a small tmpfs each test mounts: the run stops with the path and the space needed or free, leaves
no half-published artefact, and the same command finishes once space is freed (docs/distributed.md).

The failure point is set by the test, not by timing: the filesystem is too small for the token store (the check
before extraction), or it is filled to the last byte by a ballast file (any write then fails) before a stage runs.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from toolkit.artifacts import artifact_problems
from toolkit.config import load_config
from toolkit.files import DiskFullError
from toolkit.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["probe_dinov2.enabled=false", "dense.epochs=1", "probe.epochs=1", "runtime.progress=false"]


def _mount(directory: Path, size: str, remount: bool = False) -> None:
    opts = f"remount,size={size}" if remount else f"size={size}"
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(directory)], capture_output=True, text=True)
    if out.returncode:
        if remount:
            pytest.fail(f"remounting {directory}: {out.stderr.strip()}")
        pytest.skip(f"this machine refuses to mount a tmpfs (needs root; CI runs as root): {out.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (grown with `_mount(..., remount=True)`), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("this machine refuses to mount a tmpfs: the test does not run as root (CI runs as root)")
    fs = tmp_path / "fs"
    fs.mkdir()
    _mount(fs, "64k")
    yield fs
    subprocess.run(["umount", "-l", str(fs)], check=False)


def _fill(fs: Path) -> Path:
    """Fill `fs` to its last byte; returns the ballast file (delete it to free the space)."""
    ballast = fs / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                continue
    return ballast


def _published(root: Path, stage: str) -> list[Path]:
    return [p for p in (root / stage).glob("*") if not p.name.startswith(".")] if (root / stage).is_dir() else []


def test_token_store_that_does_not_fit_stops_before_extraction_then_builds(small_fs: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"cache.root={small_fs / 'cache'}",
                                                       f"runtime.output_dir={small_fs / 'runs'}", *QUICK])
    with pytest.raises(DiskFullError) as e:
        run_pipeline(cfg, until="tokens")
    msg = str(e.value)
    # tiny: 4 classes x 10 train images (validation rows are rows of this store), (56/14)^2 tokens, 64 wide
    assert "the token store of the train split needs" in msg and "(40 images x 16 tokens x 64 width x 2 bytes" in msg
    assert f"but {small_fs / 'cache' / 'tokens'} has" in msg and "cache.mode=live" in msg
    assert _published(small_fs / "cache", "tokens") == [] and not list((small_fs / "cache").rglob(".tmp-*"))

    _mount(small_fs, "16m", remount=True)  # space freed
    result = run_pipeline(cfg, until="tokens")
    for split in ("train", "test"):
        assert artifact_problems(Path(result.stages[f"tokens_{split}"]["directory"])) == []


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_every", [1, 0], ids=["resume-checkpoint", "final-checkpoint"])
def test_full_disk_while_training_names_the_path_publishes_nothing_then_resumes(small_fs: Path, tmp_path: Path,
                                                                                checkpoint_every: int) -> None:
    _mount(small_fs, "16m", remount=True)
    over = [f"cache.root={small_fs / 'cache'}", f"runtime.output_dir={tmp_path / 'runs'}", *QUICK,
            f"runtime.checkpoint_every={checkpoint_every}"]
    run_pipeline(load_config(ROOT / "configs" / "tiny.yaml", over), until="tokens")  # the stores fit
    ballast = _fill(small_fs)
    with pytest.raises(DiskFullError) as e:
        run_pipeline(load_config(ROOT / "configs" / "tiny.yaml", over), until="dense")
    msg = str(e.value)
    # The probe is the first stage to write: its resume checkpoint (checkpoint_every=1) or its model checkpoint.
    where = ".work-" if checkpoint_every else ".tmp-"
    assert "no space left on the device while writing the probe artefact or its checkpoints" in msg, msg
    assert f"({small_fs / 'cache' / 'probe'}/{where}" in msg and "free there now" in msg, msg
    assert "nothing was published" in msg
    assert _published(small_fs / "cache", "probe") == [] and not list((small_fs / "cache").rglob(".tmp-*"))

    ballast.unlink()  # space freed: the same command (with --resume) finishes
    result = run_pipeline(load_config(ROOT / "configs" / "tiny.yaml", [*over, "runtime.resume=true"]), until="dense")
    assert artifact_problems(Path(result.stages["dense"]["directory"])) == []


def test_full_disk_in_the_run_directory_names_it_then_the_run_starts(small_fs: Path, tmp_path: Path) -> None:
    _mount(small_fs, "1m", remount=True)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"cache.root={tmp_path / 'cache'}",
                                                       f"runtime.output_dir={small_fs / 'runs'}", *QUICK])
    (small_fs / "runs").mkdir()
    ballast = _fill(small_fs)
    with pytest.raises(DiskFullError, match=r"no space left on the device while writing the run directory \("
                       + str(small_fs / "runs")):
        run_pipeline(cfg, until="tokens")
    ballast.unlink()
    result = run_pipeline(cfg, until="tokens")
    assert (result.run_dir / "config.yaml").is_file() and (result.run_dir / "manifest.json").is_file()
