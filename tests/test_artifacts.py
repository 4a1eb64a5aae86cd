"""Content-hashed artefacts: one builder per key, published artefacts never deleted, and every load checks the
files against the manifest (a damaged token store is rebuilt with a warning, or stops with its path and the fix)."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest

from toolkit.artifacts import MANIFEST, DamagedArtifactError, Manifest, artifact_problems, get_or_run
from toolkit.cache import TokenStore
from toolkit.config import load_config
from toolkit.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
STORE_FILES = ["patch.npy", "cls.npy", "labels.npy", "masks.npy", "meta.json", MANIFEST]


def _build_arrays(out: Path) -> dict:
    np.save(out / "a.npy", np.arange(1000, dtype=np.float32).reshape(10, 100))
    (out / "note.txt").write_text("hello")
    return {"n": 10}


def test_manifest_lists_files_and_damage_is_named(tmp_path: Path) -> None:
    d, manifest, hit = get_or_run(tmp_path, "s", "k1", _build_arrays, config={})
    assert not hit
    assert manifest.files["a.npy"] == {"bytes": (d / "a.npy").stat().st_size, "dtype": "<f4", "shape": [10, 100],
                                       "sha256": manifest.files["a.npy"]["sha256"]}
    assert artifact_problems(d) == []
    (d / "note.txt").write_text("HELLO")  # same size, other bytes
    assert artifact_problems(d) == ["note.txt does not match its sha256 in the manifest"]


def test_damaged_artifact_is_moved_aside_and_rebuilt(tmp_path: Path) -> None:
    d, _, _ = get_or_run(tmp_path, "s", "k1", _build_arrays, config={})
    with (d / "a.npy").open("r+b") as f:
        f.truncate(200)
    warnings: list[str] = []
    d2, _, hit = get_or_run(tmp_path, "s", "k1", _build_arrays, config={}, warn=warnings.append)
    assert not hit and d2 == d and artifact_problems(d) == []
    assert len(warnings) == 1 and str(d) in warnings[0] and "a.npy has 200 bytes" in warnings[0]
    aside = list((tmp_path / "s").glob(".damaged-k1-*"))
    assert len(aside) == 1 and (aside[0] / "a.npy").stat().st_size == 200  # kept for inspection, not deleted


def test_killed_builder_leaves_nothing_a_later_run_trips_over(tmp_path: Path) -> None:
    stale = tmp_path / "s" / ".tmp-k1-deadbeef"
    stale.mkdir(parents=True)  # what a SIGKILLed builder leaves
    (tmp_path / "s" / "k1").mkdir()  # and an unpublished directory without a manifest
    d, _, hit = get_or_run(tmp_path, "s", "k1", _build_arrays, config={})
    assert not hit and not stale.exists() and (d / MANIFEST).is_file()


def test_published_artifact_is_never_replaced(tmp_path: Path) -> None:
    d, first, _ = get_or_run(tmp_path, "s", "k1", _build_arrays, config={})
    from toolkit.artifacts import _new_tmp, _publish

    tmp = _new_tmp(d)  # a second builder that finishes after the first one published
    (tmp / "a.npy").write_bytes(b"other")
    kept = _publish(tmp, d, "s", "k1", {}, None, {}, time.perf_counter())
    assert kept.created == first.created and artifact_problems(d) == [] and not tmp.exists()


def _concurrent_builder(root: str, start: str, other: str, count: str) -> None:
    def build(out: Path) -> dict:
        with open(count, "a") as f:
            f.write("built\n")
        deadline = time.monotonic() + 60
        while not Path(other).exists() and time.monotonic() < deadline:  # the other builder has started too
            time.sleep(0.05)
        return _build_arrays(out)

    Path(start).write_text("started")
    get_or_run(Path(root), "s", "same", build, config={})


def test_concurrent_builders_of_one_key_build_it_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    count = tmp_path / "count.txt"
    a, b = tmp_path / "a.started", tmp_path / "b.started"
    procs = [ctx.Process(target=_concurrent_builder, args=(str(tmp_path), str(x), str(y), str(count)))
             for x, y in ((a, b), (b, a))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)  # only stops a hang: each builder takes a second or two, even on a loaded machine
    assert [p.exitcode for p in procs] == [0, 0]
    assert count.read_text().count("built") == 1


@pytest.fixture(scope="module")
def token_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    tmp = tmp_path_factory.mktemp("tokens")
    overrides = [f"cache.root={tmp / 'art'}", f"runtime.output_dir={tmp / 'runs'}", "runtime.progress=false"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    run_pipeline(cfg, until="tokens")
    store = next((tmp / "art" / "tokens").glob("[0-9a-f]*"))
    return overrides, store


@pytest.mark.parametrize("name", STORE_FILES)
def test_truncated_token_store_file_is_rebuilt(token_run: tuple[list[str], Path], name: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    overrides, store = token_run
    stores = sorted(store.parent.glob("[0-9a-f]*"))
    target = stores[0]
    before = {f: (target / f).read_bytes() for f in STORE_FILES if (target / f).is_file()}
    assert name in before, f"the tiny store has no {name}"
    with (target / name).open("r+b") as f:
        f.truncate(max(0, len(before[name]) // 2))
    with pytest.raises(DamagedArtifactError, match=f"artefact {target} is damaged.*Delete that directory"):
        TokenStore(target, target.name)  # opened directly (evaluation, explanations): stops, naming it
    capsys.readouterr()
    run_pipeline(load_config(ROOT / "configs" / "tiny.yaml", overrides), until="tokens")
    err = capsys.readouterr().err
    print(f"{name} cut to half: {err.strip()}")
    assert f"tokens artefact {target} is damaged" in err and "rebuilding it" in err
    assert artifact_problems(target) == []
    rebuilt = {f: (target / f).read_bytes() for f in before}
    for f in before:
        if f == MANIFEST:  # differs in its timestamps only
            old, new = json.loads(before[f]), Manifest.read(target)
            assert old["files"] == new.files and old["key"] == new.key
        else:
            assert rebuilt[f] == before[f], f"{f} differs after the rebuild"
