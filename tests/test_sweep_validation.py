"""Sweeps decide on validation only: the same sweep on a dataset whose test labels are rotated (every test image filed
under the next class), or on another test subset, chooses the same trial with the same sampled values and the same
validation metrics, while its test columns differ. Plus the sweep's plot (sweep.png) and the choice rule's blindness
to test metrics, without Ray."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from rich.console import Console

import tune.runner as runner
from toolkit.config import ConfigError, load_config, replace, save_config
from toolkit.data import SPLITS
from toolkit.data.readers import SyntheticDataset
from tune import results as res
from tune.plot import draw_sweep
from tune.runner import SweepOptions, prepare

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SPACE = "finetune.l1_maps: {loguniform: [0.2, 5.0]}\nfinetune.lr: {loguniform: [2.0e-3, 5.0e-2]}\n"
SWEPT = ("finetune.l1_maps", "finetune.lr")


def _imagefolder(root: Path, *, rotate_test: bool, classes: int = 4, per_class: int = 10) -> Path:
    """The synthetic shapes as an ImageFolder tree; with `rotate_test` every test image of class c is filed under
    class c + 1 (mod C): the same pixels, wrong labels."""
    for split in SPLITS:
        ds = SyntheticDataset(num_classes=classes, per_class=per_class, seed=0, split=split, size=56)
        for i in range(len(ds)):
            image, label, _ = ds[i]
            if split == "test" and rotate_test:
                label = (label + 1) % classes
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{ds.ids[i].replace(':', '_')}.png")
    return root


def _config(tmp: Path, name: str, root: Path, *extra: str) -> Path:
    # 8 of the 16 features, 2 per class: a QP the solver closes at once (the same selection on any machine).
    cfg = replace(load_config(TINY), ["data.dataset=imagefolder", f"data.root={root}", "qp.n_features=8", *extra])
    path = tmp / f"{name}.yaml"
    save_config(cfg, path)
    return path


def _sweep(tmp: Path, config: Path, out: str) -> runner.SweepSummary:
    (tmp / "space.yaml").write_text(SPACE)
    # ASHA (its cuts read the per-epoch validation accuracy) with one trial at a time, so that every cut compares
    # the same reports in the same order in every sweep.
    opts = SweepOptions(config=config, space=tmp / "space.yaml", output=tmp / out, num_samples=3, scheduler="asha",
                        seed=11, max_concurrent=1, grace_period=2,
                        overrides=(f"cache.root={tmp / 'artifacts'}", "runtime.progress=false"))
    return runner.run_sweep(opts, console=Console(file=io.StringIO(), width=200))


def _by_index(summary: runner.SweepSummary) -> dict[str, res.TrialRow]:
    """Trials by their index in the sweep (Tune's ids differ between sweeps only in the experiment hash)."""
    return {r.trial_id.rsplit("_", 1)[1]: r for r in summary.rows}


@pytest.fixture(scope="module")
def three_sweeps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, runner.SweepSummary]:
    """The same seeded 3-trial sweep on true test labels, rotated test labels, and a smaller test subset."""
    ray = pytest.importorskip("ray")
    tmp = tmp_path_factory.mktemp("validation-sweeps")
    true_root = _imagefolder(tmp / "true", rotate_test=False)
    rotated_root = _imagefolder(tmp / "rotated", rotate_test=True)
    configs = {"true": _config(tmp, "true", true_root), "rotated": _config(tmp, "rotated", rotated_root),
               "subset": _config(tmp, "subset", true_root, "data.test_per_class=4")}
    runner._init_ray(SweepOptions(config=TINY, space=tmp, num_samples=1, output=tmp, num_cpus=2))
    try:
        yield {name: _sweep(tmp, path, f"out-{name}") for name, path in configs.items()}
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_rotated_test_labels_change_test_columns_only(three_sweeps: dict[str, runner.SweepSummary]) -> None:
    true, rotated = three_sweeps["true"], three_sweeps["rotated"]
    assert true.chosen is not None and rotated.chosen is not None
    # The same trial chosen, with the same sampled values and the same validation metrics.
    index = true.chosen.trial_id.rsplit("_", 1)[1]
    assert rotated.chosen.trial_id.rsplit("_", 1)[1] == index
    assert rotated.chosen.params == true.chosen.params
    a, b = _by_index(true), _by_index(rotated)
    assert sorted(a) == sorted(b)
    for i in a:
        assert (a[i].status, a[i].params) == (b[i].status, b[i].params)
        for key in ("val_accuracy", "val_sid_at_5", "epoch_val_accuracy", "dense_val_accuracy", "probe_val_accuracy"):
            assert a[i].get(key) == b[i].get(key), (i, key)
    assert [r.trial_id.rsplit("_", 1)[1] for r in true.front] == [r.trial_id.rsplit("_", 1)[1] for r in rotated.front]
    # ... while the test columns differ: every rotated test label is wrong, so the test accuracy collapses.
    ok = [i for i in a if a[i].status == "ok"]
    assert ok and all(a[i].get("test_accuracy") != b[i].get("test_accuracy") for i in ok)
    assert all(b[i].get("test_accuracy") < a[i].get("test_accuracy") for i in ok)
    with (rotated.output / "trials.csv").open() as f:
        rows = {r["trial_id"].rsplit("_", 1)[1]: r for r in csv.DictReader(f)}
    assert float(rows[index]["test_accuracy"]) == pytest.approx(b[index].get("test_accuracy"))
    assert rows[index]["chosen"] == "True"
    best = (rotated.output / "best.yaml").read_text()
    assert f"val_accuracy={res._fmt(rotated.chosen.get('val_accuracy'))}" in best
    assert "Test, for reading only (not used to choose)" in best


@pytest.mark.slow
def test_another_test_subset_leaves_best_yaml_swept_keys_unchanged(
        three_sweeps: dict[str, runner.SweepSummary]) -> None:
    true, subset = three_sweeps["true"], three_sweeps["subset"]

    def swept(summary: runner.SweepSummary) -> dict[str, float]:
        cfg = yaml.safe_load((summary.output / "best.yaml").read_text())
        return {k: cfg[k.split(".")[0]][k.split(".")[1]] for k in SWEPT}

    assert swept(subset) == swept(true) == {k: true.chosen.params[k] for k in SWEPT}
    assert load_config(subset.output / "best.yaml").data.test_per_class == 4  # only the test subset differs
    with (true.output / "trials.csv").open() as f, (subset.output / "trials.csv").open() as g:
        a, b = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["val_accuracy"] for r in a] == [r["val_accuracy"] for r in b]


@pytest.mark.slow
def test_the_sweep_draws_its_plot_beside_the_csv(three_sweeps: dict[str, runner.SweepSummary]) -> None:
    summary = three_sweeps["true"]
    assert summary.files["plot"] == summary.output / "sweep.png"
    with Image.open(summary.output / "sweep.png") as im:
        assert im.format == "PNG" and im.size[0] > 600


def test_plot_marks_front_chosen_stopped_and_failed_trials(tmp_path: Path) -> None:
    rows = [_row("x_00000", 0.90, 0.55), _row("x_00001", 0.85, 0.70), _row("x_00002", 0.80, 0.60),
            _row("x_00003", None, status="stopped", epoch=0.5), _row("x_00004", None, status="failed")]
    front = {r.trial_id for r in res.pareto_front(rows, (res.ACCURACY, res.SID))}
    path = draw_sweep(rows, front=front, chosen="x_00001", interp=res.SID, path=tmp_path / "sweep.png")
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    # The chosen star is red, the stopped trial orange: both colours are on the image.
    for colour in ((0xD6, 0x27, 0x28), (0xFF, 0x7F, 0x0E)):
        assert (np.abs(pixels - colour).sum(-1) < 30).any(), colour


def _row(tid: str, acc: float | None, sid: float | None = None, status: str = "ok", test: float | None = None,
         epoch: float | None = None) -> res.TrialRow:
    return res.TrialRow(trial_id=tid, status=status, params={}, metrics={
        "val_accuracy": acc, "val_sid_at_5": sid, "test_accuracy": test, "epoch_val_accuracy": epoch,
        "qp_n_per_class": 2, "seconds": 1.0})


def test_the_choice_and_front_never_read_test_metrics() -> None:
    rows = [_row("a", 0.90, 0.5, test=0.10), _row("b", 0.85, 0.7, test=0.99), _row("c", 0.80, 0.6, test=1.0)]
    front = res.pareto_front(rows, (res.ACCURACY, res.SID))
    chosen, _ = res.choose_best(front, res.SID, tolerance=0.01)
    for r in rows:  # turn the test column upside down
        r.metrics["test_accuracy"] = 1.0 - r.metrics["test_accuracy"]
    front2 = res.pareto_front(rows, (res.ACCURACY, res.SID))
    assert [r.trial_id for r in front2] == [r.trial_id for r in front] == ["a", "b"]
    assert res.choose_best(front2, res.SID, tolerance=0.01)[0].trial_id == chosen.trial_id == "a"
    assert res.ACCURACY.key == "val_accuracy" and res.SID.key == "val_sid_at_5"


def test_a_sweep_without_a_validation_split_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(SPACE)
    with pytest.raises(ConfigError, match="data.val_fraction=0 holds nothing out"):
        prepare(SweepOptions(config=TINY, space=tmp_path / "s.yaml", num_samples=1, output=tmp_path,
                             overrides=("data.val_fraction=0",)))
