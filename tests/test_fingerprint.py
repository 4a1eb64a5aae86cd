"""Stage keys follow the code: each stage's key holds a fingerprint of the toolkit modules it reaches, so editing the
loss code rebuilds the training stages and keeps the token stores, and editing the backbone code rebuilds everything
(toolkit/fingerprint.py). Edits are made on a copy of the package, never on the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.artifacts import content_key
from toolkit.fingerprint import SourceTree, stage_fingerprint

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tokens", "probe", "probe_dinov2", "dense", "select", "finetune")
TRAINING = ("probe", "probe_dinov2", "dense", "select", "finetune")  # everything that reaches the loss module
# A change to what a loss function computes (the same value here, but other code: the hash cannot know that).
LOSS_EDIT = ("    return maps.float().abs().mean()", "    return maps.abs().float().mean()")
BACKBONE_EDIT = ("    kwargs = {**cfg.arch_overrides(), **(model_kwargs or {})}",
                 "    kwargs = dict(cfg.arch_overrides(), **(model_kwargs or {}))")


def _copy(tmp: Path) -> Path:
    """A copy of the toolkit package under tmp/src/toolkit; returns that package folder."""
    dst = tmp / "src" / "toolkit"
    shutil.copytree(ROOT / "toolkit", dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: the edit's anchor {old!r} is gone; update the test"
    path.write_text(text.replace(old, new))


def _digests(package: Path) -> dict[str, str]:
    tree = SourceTree(package)  # a fresh tree: nothing cached from before the edit
    return {stage: tree.fingerprint(f"toolkit.stages.{stage}").digest for stage in STAGES}


def test_closures_follow_the_imports_a_stage_makes() -> None:
    tree = SourceTree()
    tokens = tree.closure("toolkit.stages.tokens")
    assert {"toolkit.cache", "toolkit.model.backbone", "toolkit.data", "toolkit.artifacts"} <= set(tokens)
    assert not any(m.startswith(("toolkit.train", "toolkit.qp")) for m in tokens), tokens
    dense = tree.closure("toolkit.stages.dense")
    # `from toolkit.train import train_model` reaches trainer.py and what it imports (the loop, the losses, the
    # DeepSpeed engine imported inside a function), not every module the package's __init__ re-exports from.
    assert {"toolkit.train.trainer", "toolkit.train.loop", "toolkit.train.losses", "toolkit.train._deepspeed"} <= set(
        dense)
    assert "toolkit.train" not in dense and "toolkit.train.tensorboard" not in dense
    assert "toolkit.stages.select" in tree.closure("toolkit.stages.finetune")
    fp = stage_fingerprint("dense")
    assert sorted(fp.modules) == dense and fp is stage_fingerprint("dense")  # computed once per process


def test_loss_edit_changes_the_training_stages_only_and_reverting_restores(tmp_path: Path) -> None:
    package = _copy(tmp_path)
    before = _digests(package)
    assert before == {s: stage_fingerprint(s).digest for s in STAGES}  # the copy fingerprints like the checkout
    losses = package / "train" / "losses.py"
    original = losses.read_text()
    _edit(losses, *LOSS_EDIT)
    after = _digests(package)
    assert after["tokens"] == before["tokens"]
    assert all(after[s] != before[s] for s in TRAINING), (before, after)
    losses.write_text(original)
    assert _digests(package) == before


def test_backbone_edit_changes_every_stage(tmp_path: Path) -> None:
    package = _copy(tmp_path)
    before = _digests(package)
    _edit(package / "model" / "backbone.py", *BACKBONE_EDIT)
    after = _digests(package)
    assert all(after[s] != before[s] for s in STAGES), (before, after)


def test_comments_docstrings_and_layout_do_not_count(tmp_path: Path) -> None:
    package = _copy(tmp_path)
    before = _digests(package)
    losses = package / "train" / "losses.py"
    text = losses.read_text().replace('"""', '"""Reworded. ', 1)  # the module docstring
    losses.write_text(text.replace(LOSS_EDIT[0], LOSS_EDIT[0] + "  # a comment\n\n"))
    assert _digests(package) == before


def test_a_content_key_needs_a_stage_module() -> None:
    assert content_key("dense", {}) != content_key("finetune", {})
    with pytest.raises(ValueError, match=r"no stage module toolkit/stages/qp\.py.*select"):
        content_key("qp", {})


def _run(tmp: Path, package: Path) -> dict[str, bool]:
    """The tiny config up to finetune with the toolkit copy `package`; stage -> whether it was loaded from cache."""
    env = {**os.environ, "PYTHONPATH": str(package.parent), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--until", "finetune", f"cache.root={tmp / 'art'}", f"runtime.output_dir={tmp / 'runs'}",
           "runtime.run_name=r", "runtime.progress=false"]
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((tmp / "runs" / "r" / "manifest.json").read_text())
    return {stage: entry["cached"] for stage, entry in manifest["stages"].items()}


@pytest.mark.slow
def test_tiny_run_rebuilds_what_a_code_edit_touches(tmp_path: Path) -> None:
    package = _copy(tmp_path)
    first = _run(tmp_path, package)
    assert set(first) == {"tokens_train", "tokens_test", "probe", "probe_dinov2", "dense", "select", "finetune"}
    assert not any(first.values())
    losses = package / "train" / "losses.py"
    original = losses.read_text()
    _edit(losses, *LOSS_EDIT)
    assert _run(tmp_path, package) == {"tokens_train": True, "tokens_test": True, "probe": False,
                                       "probe_dinov2": False, "dense": False, "select": False, "finetune": False}
    losses.write_text(original)
    assert all(_run(tmp_path, package).values())
    # Why it rebuilt: the dense artefacts of the two codes differ in the loss module's hash only.
    dense = sorted((tmp_path / "art" / "dense").glob("[0-9a-f]*"), key=lambda d: d.stat().st_mtime)
    codes = [json.loads((d / "manifest.json").read_text())["code"]["modules"] for d in dense]
    assert len(codes) == 2 and [m for m in codes[0] if codes[0][m] != codes[1][m]] == ["toolkit.train.losses"]
    _edit(package / "model" / "backbone.py", *BACKBONE_EDIT)
    assert not any(_run(tmp_path, package).values())
