"""benchmarks/scaling.py keeps working: a real run of it on the tiny config at two sizes (synthetic shapes, a tiny
random-init ViT), its record of each size, its plots, and its resume rule (same settings skipped, other settings
run again). The big sizes are the benchmark's, not the tests'."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("scaling", ROOT / "benchmarks" / "scaling.py")
scaling = sys.modules["scaling"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)  # benchmarks/ is a folder of scripts, not a package


def test_loglog_slope() -> None:
    assert scaling.loglog_slope([10, 100, 1000], [3, 300, 30000]) == pytest.approx(2.0)
    assert scaling.loglog_slope([10, 100], [5, 50]) == pytest.approx(1.0)
    assert scaling.loglog_slope([10, 10], [5, 7]) is None  # one n says nothing about growth
    assert scaling.loglog_slope([10, 100], [0, 50]) is None  # log of a zero time


def test_refuses_keys_it_sets_itself(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert scaling.main(["--output", str(tmp_path), "--plan", "data.train_per_class=5"]) == 2
    assert "data.train_per_class=5: this script sets" in capsys.readouterr().err


@pytest.mark.slow
def test_two_tiny_sizes_recorded_plotted_and_resumed(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out, plots = tmp_path / "out", tmp_path / "plots"
    base = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--output", str(out), "--plots", str(plots),
            "--test-per-class", "5"]
    overrides = ["qp.time_limit=1"]  # the tiny config's 10 s search would be most of the test's time

    assert scaling.main([*base, "--per-class", "5", "10", *overrides]) == 0
    text = capfd.readouterr().out
    assert "test per class 5 (10 per class: all)" in text and "reuses no tokens" in text
    saved = json.loads((out / "scaling.json").read_text())
    records = saved["records"]
    assert [(r["per_class"], r["test_per_class"], r["n_train"], r["n_test"]) for r in records] == [
        (5, 5, 20, 20), (10, None, 40, 40)]  # 4 classes; the largest size reads the whole test split
    for r in records:
        assert set(r["stages"]) == set(scaling.STAGES)
        assert all(v["seconds"] > 0 for v in r["stages"].values()), r["stages"]
        assert not any(v["cached"] for k, v in r["stages"].items() if k != "tokens_test")
        for model in scaling.MODELS:
            assert all(0 <= r["accuracy"][model][split] <= 1 for split in ("val", "test")), (model, r["accuracy"])
        assert r["extraction_images_per_second"] > 0 and r["peak_rss_bytes"] > 100e6  # a process with torch
        # Sampled every second: the run's own heap (torch alone is > 100 MB), below the peak that counts mapped files.
        assert 100e6 < r["peak_anon_bytes"] <= r["peak_rss_bytes"] and r["memory_series"]
        estimate = sum(r["token_store_estimate_bytes"].values())
        assert 0.5 * estimate < r["token_disk_bytes"]["total"] < 2 * estimate
        assert r["overrides"] == overrides and "launch/train.py" in r["command"] and Path(r["run_dir"]).is_dir()
        assert len(r["machine"]["loadavg_start"]) == 3 and r["machine"]["cores"] >= 1
    assert records[0]["run_dir"] != records[1]["run_dir"]
    slopes = saved["slopes"][records[0]["family"]]
    assert set(slopes) == set(scaling.STAGES) and all(isinstance(v, float) for v in slopes.values()), slopes
    assert "slope of log seconds against log n" in text
    for name in ("scaling_time.png", "scaling_accuracy.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same command again: both sizes are recorded with these settings, nothing runs.
    runs = sorted((out / "runs").iterdir())
    assert scaling.main([*base, "--per-class", "5", "10", *overrides]) == 0
    text = capfd.readouterr().out
    assert text.count("per class: recorded in") == 2 and "launch/train.py" not in text
    assert json.loads((out / "scaling.json").read_text())["records"] == records
    assert sorted((out / "runs").iterdir()) == runs

    # Another override is another setting: the size runs again, beside the old records, in its own run directory.
    assert scaling.main([*base, "--per-class", "5", "qp.time_limit=2"]) == 0
    text = capfd.readouterr().out
    assert "per class: recorded in" not in text and "launch/train.py" in text
    after = json.loads((out / "scaling.json").read_text())["records"]
    assert after[:2] == records and len(after) == 3
    assert after[2]["config_hash"] not in {r["config_hash"] for r in records}
    assert after[2]["family"] != records[0]["family"] and after[2]["run_dir"] not in {r["run_dir"] for r in records}
