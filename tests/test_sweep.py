"""Sweeps: space parsing and validation, Pareto front and choice, output-folder and resource checks (fast); real Ray
Tune sweeps on the tiny config (slow): trials that share their token cache and dense model, multi-worker trials
through Ray Train, a trial whose workers cannot start, an interrupted sweep resumed, and seeded sampling."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from rich.console import Console

import tune.runner as runner
from toolkit.config import ConfigError, load_config, replace, save_config
from tune import results as res
from tune.runner import SweepOptions, export_best, plan_concurrency, prepare, summarize
from tune.space import load_space, override, parse_space, validate_space
from tune.sweep import main, parse_args
from tune.trial import PLACEMENT_GROUP_FILE, EpochReporter, ReleaseWorkers, TrialSetup, train_dir, trial_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


# ------------------------------------------------------------------------------------------- search spaces


def test_space_parses_dotted_and_nested_keys_distributions_and_fixed_values() -> None:
    space = parse_space({"finetune.l1_maps": {"loguniform": [0.5, 20.0]}, "qp": {"n_features": {"choice": [4, 6]},
                         "redundancy_weight": {"uniform": [0.5, 2]}}, "qp.n_per_class": {"randint": [1, 3]},
                         "finetune.epochs": 2})
    assert set(space.params) == {"finetune.l1_maps", "qp.n_features", "qp.redundancy_weight", "qp.n_per_class"}
    assert space.fixed == {"finetune.epochs": 2}
    assert space.params["qp.n_per_class"].representatives() == [1, 2]  # Ray's randint excludes the upper bound
    domains = space.to_ray()
    assert domains["finetune.l1_maps"].lower == 0.5 and domains["finetune.l1_maps"].upper == 20.0
    assert domains["qp.n_features"].categories == [4, 6]


@pytest.mark.parametrize("spec, match", [
    ({"qp.n_features": {"choise": [4, 6]}}, "unknown distribution 'choise'"),
    ({"finetune.lr": {"loguniform": [0.0, 1.0]}}, "must be > 0"),
    ({"finetune.lr": {"uniform": [1.0, 0.5]}}, "lower bound must be below"),
    ({"finetune.lr": {"uniform": ["1e-3", 0.5]}}, "bounds must be numbers"),  # YAML reads 1e-3 as a string
    ({"qp.n_features": {"choice": []}}, "non-empty list"),
    ({"qp.n_features": {"randint": [1.5, 4]}}, "must be integers"),
    ({"finetune.epochs": 3}, "no distribution"),
])
def test_bad_space_is_refused(spec: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_space(spec)


@pytest.mark.parametrize("spec, match", [
    ({"qp.n_feature": {"choice": [4]}}, "Did you mean 'qp.n_features'"),
    ({"qpp.n_features": {"choice": [4]}}, "Did you mean 'qp'"),
    ({"qp": {"choice": [4]}}, "is a section"),
    ({"qp.n_features": {"uniform": [2, 6]}}, "randint"),  # an integer key cannot take real numbers
    ({"finetune.lr": {"choice": [0.1, "fast"]}}, "do not fit"),
    ({"runtime.run_name": {"choice": ["a", "b"]}}, "set by the sweep"),
    ({"qp.solver": {"choice": ["highs", "cplex"]}}, "do not fit"),
])
def test_space_keys_and_types_are_checked_against_runconfig(spec: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_space(parse_space(spec), load_config(TINY))


def test_values_impossible_against_the_base_are_warnings_not_errors() -> None:
    base = load_config(TINY)  # qp.n_features = 6
    warnings = validate_space(parse_space({"qp.n_per_class": {"grid": [1, 2, 9]}}), base)
    assert len(warnings) == 1 and "qp.n_per_class=9" in warnings[0] and "n_features=6" in warnings[0]


def test_default_space_covers_the_issue_keys_and_fits_the_demo_config() -> None:
    space = load_space(ROOT / "tune" / "spaces" / "default.yaml")
    assert {"finetune.l1_maps", "finetune.l1_vector", "finetune.diversity_weight", "qp.n_features",
            "qp.n_per_class", "qp.redundancy_threshold", "qp.redundancy_weight", "finetune.lr"} <= set(space.params)
    assert validate_space(space, load_config(ROOT / "configs" / "demo.yaml")) == []


@pytest.mark.parametrize("value", [1e-5, 0.25, 3, None, True, "highs"])
def test_override_round_trips_through_the_config_parser(value: object) -> None:
    key = {float: "finetune.lr", int: "qp.n_features", type(None): "qp.redundancy_threshold",
           bool: "data.reference_minmax", str: "qp.solver"}[type(value)]
    cfg = replace(load_config(TINY), [override(key, value)])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


def test_trial_config_gives_each_trial_its_own_run_dir_and_raises_when_impossible(tmp_path: Path) -> None:
    setup = TrialSetup(base=load_config(TINY), output=str(tmp_path))
    cfg = trial_config(setup, {"qp.n_per_class": 3, "finetune.lr": 1e-4}, "abc_00001")
    assert cfg.qp.n_per_class == 3 and cfg.finetune.lr == 1e-4
    assert Path(cfg.runtime.output_dir) == tmp_path / "runs" and cfg.runtime.run_name == "trial-abc_00001"
    assert cfg.runtime.engine == "auto"
    assert trial_config(TrialSetup(base=load_config(TINY), output=str(tmp_path), workers=2), {},
                        "x").runtime.engine == "deepspeed"
    with pytest.raises(ConfigError, match="qp.n_per_class"):
        trial_config(setup, {"qp.n_per_class": 9}, "abc_00002")
    with pytest.raises(ConfigError, match="needs a validation split"):
        trial_config(setup, {"data.val_fraction": 0.0}, "abc_00003")


def test_epoch_reporter_counts_trained_stages_and_reports_finetune_epochs_with_checkpoints(tmp_path: Path) -> None:
    seen: list[tuple[dict, dict | None]] = []
    # The run's log says which artefacts this trial built (toolkit.artifacts.get_or_run's messages).
    (tmp_path / "log.txt").write_text("t0 tokens: built in 0.6s (/c/tokens/a)\n"
                                      "t1 tokens: built by another process (/c/tokens/b)\nt2 dense: cached (/c/d)\n")

    def report(metrics: dict, directory: Path | None) -> None:
        progress = json.loads((directory / "progress.json").read_text()) if directory else None
        seen.append((metrics, progress))

    rep = EpochReporter(report, is_main=True, run_dir=tmp_path)
    rep("dense", {"epoch": 1, "ce": 1.0, "train_accuracy": 0.5})
    assert seen == []  # dense epochs run in only one of the trials sharing them: not reported
    rep("finetune", {"epoch": 1, "ce": 0.7, "l1_maps": 0.2, "train_accuracy": 0.75, "val_accuracy": 0.5})
    metrics, progress = seen[-1]
    # The scheduler's signal is the epoch's validation accuracy; the final validation accuracy is not known yet.
    assert metrics["epoch_val_accuracy"] == 0.5 and metrics["val_accuracy"] is None
    assert metrics["train_accuracy"] == 0.75 and metrics["loss_l1_maps"] == 0.2
    assert metrics["trained_dense"] == 1 and metrics["trained_probe"] == 0 and progress["epoch"] == 1
    assert metrics["backbone_passes"] == 1


def test_prepare_makes_paths_absolute_and_rejects_optuna_with_grid(tmp_path: Path) -> None:
    space = tmp_path / "s.yaml"
    space.write_text("qp.n_per_class: {grid: [1, 2]}\nfinetune.epochs: 1\n")
    opts = SweepOptions(config=TINY, space=space, num_samples=1, output=tmp_path, overrides=("cache.root=rel/c",))
    base, parsed, warnings = prepare(opts)
    assert Path(base.cache.root).is_absolute() and base.cache.root.endswith("rel/c")
    assert base.finetune.epochs == 1 and warnings == []
    with pytest.raises(ConfigError, match="grid"):
        prepare(SweepOptions(config=TINY, space=space, num_samples=1, output=tmp_path, search="optuna"))


def test_cli_refuses_a_bad_space_before_ray_starts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    space = tmp_path / "s.yaml"
    space.write_text("qp.n_featurs: {choice: [4]}\n")
    args = ["--config", str(TINY), "--space", str(space), "--num-samples", "2", "--output", str(tmp_path / "o")]
    assert parse_args([*args, "--scheduler", "fifo", "dense.epochs=1"]).overrides == ("dense.epochs=1",)
    assert main(args) == 2
    assert "Did you mean 'qp.n_features'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_output_folder_holding_a_sweep_is_refused_and_left_as_it_was(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sw"
    out.mkdir()
    (out / "table.txt").write_text("the earlier sweep's table")
    args = ["--config", str(TINY), "--space", str(ROOT / "tune" / "spaces" / "default.yaml"), "--num-samples", "2",
            "--output", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a sweep (table.txt)" in err and "--resume" in err and f"--output {out}-2" in err
    assert sorted(p.name for p in out.iterdir()) == ["table.txt"]
    assert (out / "table.txt").read_text() == "the earlier sweep's table"


def test_resume_needs_an_earlier_sweep_that_asked_for_the_same(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sw"
    args = ["--config", str(TINY), "--space", str(ROOT / "tune" / "spaces" / "default.yaml"), "--num-samples", "2",
            "--output", str(out), "--resume"]
    assert main(args) == 2
    assert "holds no sweep to continue" in capsys.readouterr().err
    (out / "ray" / "sweep").mkdir(parents=True)
    opts = parse_args(args)
    base, space, _ = prepare(opts)
    request = runner.request_of(opts, base, space, seed=3)
    (out / "request.json").write_text(json.dumps({**request, "num_samples": 5}))
    assert main(args) == 2
    assert "different num_samples" in capsys.readouterr().err
    (out / "request.json").write_text(json.dumps(request))
    assert runner._check_output(opts, runner.request_of(opts, base, space, seed=99))["seed"] == 3  # the stored seed


@pytest.mark.parametrize("kw, cluster, expected", [
    ({"workers_per_trial": 2}, {"CPU": 2.0, "memory": 2**34}, 1),  # 1 CPU per worker: one trial at a time on 2 CPUs
    ({"workers_per_trial": 2}, {"CPU": 5.0, "memory": 2**34}, 2),
    ({"workers_per_trial": 2, "cpus_per_trial": 1.0}, {"CPU": 2.0, "memory": 2**34}, 2),
    ({"workers_per_trial": 2, "max_concurrent": 1}, {"CPU": 8.0, "memory": 2**34}, 1),
    ({"workers_per_trial": 2}, {"CPU": 8.0, "memory": 2.5 * 2**30}, 2),  # each waiting driver holds 1 GiB
    ({"gpus_per_trial": 0.5}, {"CPU": 8.0, "GPU": 1.0}, 2),
    ({}, {"CPU": 2.0}, 2),
])
def test_concurrency_is_what_the_cluster_fits(kw: dict, cluster: dict, expected: int) -> None:
    opts = SweepOptions(config=TINY, space=TINY, num_samples=4, output=TINY, **kw)
    assert plan_concurrency(opts, cluster) == expected


def test_a_trial_larger_than_the_cluster_is_refused_before_it_starts() -> None:
    opts = SweepOptions(config=TINY, space=TINY, num_samples=1, output=TINY, workers_per_trial=3)
    with pytest.raises(ConfigError, match="needs 3 CPU for 3 worker.s. but the Ray cluster has 2"):
        plan_concurrency(opts, {"CPU": 2.0, "memory": 2**34})
    with pytest.raises(ConfigError, match="1 GiB of memory but the Ray cluster has 0.5 GiB"):
        plan_concurrency(opts, {"CPU": 8.0, "memory": 2**29})
    with pytest.raises(ConfigError, match="--gpus-per-trial"):
        plan_concurrency(SweepOptions(config=TINY, space=TINY, num_samples=1, output=TINY, gpus_per_trial=1),
                         {"CPU": 2.0})


def test_the_table_shows_full_trial_ids_however_many_columns(tmp_path: Path) -> None:
    keys = [f"finetune.key_number_{i}" for i in range(10)]
    rows = [res.TrialRow(trial_id=f"b1308aa{i}_0000{i}", status="failed", params=dict.fromkeys(keys, 0.123456),
                         reason="ConfigError: x") for i in range(3)]
    out = io.StringIO()
    summarize(rows, keys, tmp_path, tolerance=0.01, console=Console(file=out, width=80), seed=4)
    for text in (out.getvalue(), (tmp_path / "table.txt").read_text()):
        assert all(r.trial_id in text for r in rows)
    assert json.loads((tmp_path / "sweep.json").read_text())["seed"] == 4
    assert "--seed 4" in out.getvalue()


# ------------------------------------------------------------------------------------ Pareto front, choice


def _row(tid: str, acc: float | None, sid: float | None = None, m: int = 2, status: str = "ok",
         seconds: float = 1.0, test: float | None = None) -> res.TrialRow:
    """A trial row: `acc` and `sid` are validation metrics (what decides); `test` the test accuracy (read only)."""
    return res.TrialRow(trial_id=tid, status=status, params={"qp.n_per_class": m},
                        metrics={"val_accuracy": acc, "val_sid_at_5": sid, "qp_n_per_class": m, "seconds": seconds,
                                 "test_accuracy": test})


def test_pareto_front_keeps_exactly_the_non_dominated_completed_trials() -> None:
    rows = [_row("a", 0.90, 0.5), _row("b", 0.85, 0.7), _row("c", 0.80, 0.6),  # c is dominated by b
            _row("d", 0.95, 0.3), _row("e", 0.95, 0.3), _row("f", None, status="stopped"),
            _row("g", None, status="failed")]
    front = res.pareto_front(rows, (res.ACCURACY, res.SID))
    assert {r.trial_id for r in front} == {"a", "b", "d", "e"}  # equal points do not dominate each other


def test_interpretability_axis_is_sid_when_every_completed_trial_has_it_else_features_per_class() -> None:
    assert res.interpretability_objective([_row("a", 0.9, 0.5), _row("b", 0.8, 0.6)]) is res.SID
    assert res.interpretability_objective([_row("a", 0.9, 0.5), _row("b", 0.8, None)]) is res.COMPACTNESS
    front = res.pareto_front([_row("a", 0.9, m=5), _row("b", 0.9, m=3), _row("c", 0.7, m=1)],
                             (res.ACCURACY, res.COMPACTNESS))
    assert {r.trial_id for r in front} == {"b", "c"}  # fewer features per class is better


def test_choice_takes_the_most_interpretable_front_trial_within_the_accuracy_tolerance() -> None:
    front = [_row("a", 0.950, 0.30), _row("b", 0.945, 0.50), _row("c", 0.900, 0.90)]
    chosen, rule = res.choose_best(front, res.SID, tolerance=0.01)
    assert chosen.trial_id == "b" and "within 0.01" in rule and "0.9500" in rule and "validation" in rule
    assert res.choose_best(front, res.SID, tolerance=0.0)[0].trial_id == "a"
    assert res.choose_best(front, res.SID, tolerance=0.1)[0].trial_id == "c"


def test_failure_reason_is_the_root_cause_in_one_line() -> None:
    try:
        try:
            raise ConfigError("config key 'qp.n_per_class': must be in [1, qp.n_features=6], got 9")
        except ConfigError as inner:
            raise RuntimeError("trial failed\nTraceback ...") from inner
    except RuntimeError as outer:
        reason = res.failure_reason(outer)
    assert reason == "ConfigError: config key 'qp.n_per_class': must be in [1, qp.n_features=6], got 9"
    wrapped = RuntimeError("Traceback (most recent call last):\n  File x\ntoolkit.config.ConfigError: bad value")
    assert res.failure_reason(wrapped) == "ConfigError: bad value"
    # Ray Train's health-check error says which worker; why it failed is in its `health_check_failure`.
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    died = WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: Worker(pid=1, " + "x" * 600 + ")",
                                        failure=RuntimeError("The actor died unexpectedly: killed by OOM"))
    assert res.failure_reason(died) == "RuntimeError: The actor died unexpectedly: killed by OOM"


def test_summarize_writes_table_csv_best_yaml_and_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "trial-b"
    run_dir.mkdir(parents=True)
    cfg = replace(load_config(TINY), ["qp.n_per_class=1"])
    save_config(cfg, run_dir / "config.yaml")
    rows = [_row("a", 0.9, m=2), _row("b", 0.9, m=1), _row("c", None, status="failed")]
    rows[1].metrics["run_dir"] = str(run_dir)
    rows[2].reason = "ConfigError: [bad] value"
    summary = summarize(rows, ["qp.n_per_class"], tmp_path, tolerance=0.01, console=Console(file=io.StringIO()))
    assert summary.chosen.trial_id == "b" and summary.interp is res.COMPACTNESS
    table = (tmp_path / "table.txt").read_text()
    assert "val accuracy" in table and "test accuracy" in table and "val SID@5" in table and "[bad] value" in table
    with (tmp_path / "trials.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["status"] for r in csv_rows] == ["ok", "ok", "failed"] and csv_rows[1]["chosen"] == "True"
    best = tmp_path / "best.yaml"
    assert "# Rule: Pareto front" in best.read_text()
    assert load_config(best) == cfg  # best.yaml is a loadable config
    assert json.loads((tmp_path / "sweep.json").read_text())["chosen"] == "b"


def test_export_best_reports_a_missing_exporter_and_runs_a_present_one(tmp_path: Path, monkeypatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    chosen = _row("b", 0.9)
    chosen.metrics["run_dir"] = str(tmp_path / "run")
    summary = runner.SweepSummary(output=tmp_path, rows=[chosen], front=[chosen], chosen=chosen, rule="r",
                                  interp=res.SID)
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    console = Console(force_terminal=False, width=300)
    assert export_best(summary, console) == 2
    assert "export/to_onnx.py is not in this checkout" in capsys.readouterr().out
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "to_onnx.py").write_text(
        "import sys, pathlib\na = sys.argv\n"
        "pathlib.Path(a[a.index('--out') + 1]).write_text(a[a.index('--run') + 1])\n")
    assert export_best(summary, console) == 0
    assert (tmp_path / "best.onnx").read_text() == str(tmp_path / "run")


# -------------------------------------------------------------------------------- a real sweep (Ray, CPU)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory):
    """One local Ray instance (2 CPUs, no dashboard) for the sweeps of this module."""
    tmp = tmp_path_factory.mktemp("ray")
    runner._init_ray(SweepOptions(config=TINY, space=tmp, num_samples=1, output=tmp, num_cpus=2))
    yield
    ray.shutdown()


def _sweep(tmp: Path, space: str, callbacks: list | None = None, out: str = "out", **kw: object) -> runner.SweepSummary:
    (tmp / "space.yaml").write_text(space)
    kw = {"num_samples": 1, "scheduler": "fifo", "seed": 0, **kw}
    opts = SweepOptions(config=TINY, space=tmp / "space.yaml", output=tmp / out,
                        overrides=(f"cache.root={tmp / 'artifacts'}", "runtime.progress=false"), **kw)
    return runner.run_sweep(opts, callbacks=callbacks)


@pytest.fixture(scope="module")
def tiny_sweep(local_ray, tmp_path_factory: pytest.TempPathFactory) -> tuple[runner.SweepSummary, Path]:
    """One 4-trial FIFO sweep on the tiny config: qp.n_per_class on a grid with one impossible value (9 > the 6
    features), the fine-tune sparsity weight random; two trials at a time, so shared stages are contended."""
    tmp = tmp_path_factory.mktemp("sweep")
    space = "finetune.l1_maps: {loguniform: [0.5, 5.0]}\nqp.n_per_class: {grid: [2, 3, 4, 9]}\n"
    return _sweep(tmp, space, cpus_per_trial=1), tmp / "artifacts"


@pytest.mark.slow
def test_sweep_shares_work_and_writes_table_csv_and_best(tiny_sweep) -> None:
    summary, root = tiny_sweep
    out = summary.output
    cfg = load_config(TINY)
    ok = [r for r in summary.rows if r.status == "ok"]
    assert len(summary.rows) == 4 and len(ok) == 3
    # Shared work: the trials started two at a time, yet the backbone passed once over each split (train, test) and
    # the dense model (and the linear probe) trained once; every trial fine-tuned its own model.
    work = json.loads((out / "sweep.json").read_text())["shared_work"]
    assert work["backbone_passes_per_split"] == 1 and work["dense_trainings"] == 1
    assert work["probe_trainings"] == 1 and work["finetune_trainings"] == 3
    assert 1 <= work["backbone_constructions"] <= 2  # 2 when two trials each extracted one split

    def artefacts(stage: str) -> list[Path]:  # complete artefact directories (not locks, not temporaries)
        return [p for p in (root / stage).iterdir() if (p / "manifest.json").is_file() and not p.name.startswith(".")]

    assert len(artefacts("tokens")) == 2 and len(artefacts("dense")) == 1  # tokens: the train and test stores
    # Per-epoch reports: each completed trial reported every fine-tune epoch, then its final result.
    assert all(r.iterations == cfg.finetune.epochs + 1 for r in ok)
    # Table, CSV, best.yaml.
    table = (out / "table.txt").read_text()
    for col in ("val accuracy", "val SID@5", "test accuracy", "plausibility", "QP gap", "time (s)", "n_per_class"):
        assert col in table
    with (out / "trials.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert sorted(r["status"] for r in csv_rows) == ["failed", "ok", "ok", "ok"]
    for split in ("val", "test"):
        assert all(0.0 <= float(r[f"{split}_accuracy"]) <= 1.0 for r in csv_rows if r["status"] == "ok")
    assert sum(r["chosen"] == "True" for r in csv_rows) == 1
    best_text = (out / "best.yaml").read_text()
    assert "# Rule: Pareto front" in best_text and f"# Interpretability metric: {summary.interp.key}" in best_text
    best = load_config(out / "best.yaml")
    chosen_dir = Path(summary.chosen.get("run_dir"))
    assert best == load_config(chosen_dir / "config.yaml") and (chosen_dir / "checkpoint").is_dir()
    assert summary.chosen.trial_id in {r.trial_id for r in summary.front}
    assert best.qp.n_per_class == summary.chosen.params["qp.n_per_class"]


@pytest.mark.slow
def test_impossible_trial_fails_with_its_reason_and_the_sweep_goes_on(tiny_sweep) -> None:
    summary, _ = tiny_sweep
    failed = [r for r in summary.rows if r.status == "failed"]
    assert len(failed) == 1 and failed[0].params["qp.n_per_class"] == 9
    assert failed[0].reason.startswith("ConfigError: config key 'qp.n_per_class'") and "got 9" in failed[0].reason
    assert sorted(r.params["qp.n_per_class"] for r in summary.rows if r.status == "ok") == [2, 3, 4]
    assert "got 9" in (summary.output / "table.txt").read_text()



def _wait_until(condition, what: str = "the condition") -> None:
    """Return once `condition()` holds; the deadline only turns a hang into a failure, it never decides a pass."""
    deadline = time.monotonic() + 300
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never held")
        time.sleep(0.05)


def _created_placement_groups() -> list[str]:
    from ray.util import placement_group_table

    return [k for k, v in placement_group_table().items() if v["state"] != "REMOVED"]


@pytest.mark.slow
def test_release_workers_removes_the_placement_group_a_trial_left_behind(local_ray, tmp_path: Path) -> None:
    """What happens when Tune stops a trial: the group its workers used outlives it until the sweep removes it."""
    from types import SimpleNamespace

    from ray.util import placement_group

    pg = placement_group([{"CPU": 0.5}])
    pg.wait(60)
    folder = train_dir(tmp_path, "t_00001")
    folder.mkdir(parents=True)
    (folder / PLACEMENT_GROUP_FILE).write_text(pg.id.hex())
    release = ReleaseWorkers(str(tmp_path))
    release.on_trial_complete(0, [], SimpleNamespace(trial_id="t_00000"))  # no workers: nothing to do
    assert pg.id.hex() in _created_placement_groups() and release.released == []
    release.on_trial_complete(0, [], SimpleNamespace(trial_id="t_00001"))
    assert pg.id.hex() not in _created_placement_groups() and release.released == ["t_00001"]
    release.on_trial_error(0, [], SimpleNamespace(trial_id="t_00001"))  # already removed: not released twice
    assert release.released == ["t_00001"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_trials_with_two_workers_each_finish_on_two_cpus(tmp_path: Path) -> None:
    """docs/sweeps.md's multi-worker command on the tiny config, as a user runs it: 2 trials x 2 workers (1 CPU each) on
    a 2-CPU Ray, so the trials queue; ASHA as in docs/sweeps.md. Each trial trains with Ray Train's TorchTrainer and
    the DeepSpeed engine; worker lines are printed once, and nothing from Ray follows the summary."""
    space = tmp_path / "space.yaml"
    space.write_text("finetune.l1_maps: {loguniform: [0.5, 5.0]}\nqp.n_per_class: {choice: [2, 3]}\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not this module's
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "tune" / "sweep.py"), "--config", str(TINY), "--space", str(space),
           "--num-samples", "2", "--scheduler", "asha", "--workers-per-trial", "2", "--num-cpus", "2", "--seed", "3",
           "--output", str(out), f"cache.root={tmp_path / 'artifacts'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"ok", "stopped"}, rows
    table = (out / "table.txt").read_text()
    assert all(r["trial_id"] in table and r["trial_id"] in proc.stdout for r in rows)  # full ids, not cut
    epochs = load_config(TINY).finetune.epochs
    for r in rows:
        run_dir = Path(r["run_dir"]) if r["run_dir"] else out / "runs" / f"trial-{r['trial_id']}"
        assert load_config(run_dir / "config.yaml").runtime.engine == "deepspeed"
        assert "world_size=2 nodes=1 backend=gloo" in (run_dir / "log.txt").read_text()
        # Each worker line once (Ray Train's print patch printed every one twice).
        assert len(re.findall(rf"world_size=2 nodes=1 backend=gloo .*trial-{r['trial_id']}\b", log)) <= 1
        if r["status"] == "ok":
            assert int(r["iterations"]) == epochs + 1
    assert any(r["status"] == "ok" for r in rows)
    # The summary's last line ends the output: Ray is shut down before the summary is printed.
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines[-1].startswith("seed: 3 ")
    assert "(RayTrainWorker" not in proc.stdout.split("sweep trials (* Pareto front")[-1]
    assert json.loads((out / "request.json").read_text())["seed"] == 3


@pytest.mark.slow
@pytest.mark.distributed
def test_a_trial_whose_workers_cannot_start_fails_with_its_reason_and_the_others_report(local_ray,
                                                                                      tmp_path: Path) -> None:
    """Another job holds 1 of the 2 CPUs until the first trial has failed: its 2 workers (1 CPU each) cannot start,
    Train retries once (--max-retries 1), the trial fails with why, and the second trial then runs."""
    import ray
    from ray import tune
    from ray.util import placement_group, placement_group_table, remove_placement_group

    blocker = placement_group([{"CPU": 1}])
    blocker.wait(60)

    class FreeTheCpuAfterTheFailure(tune.Callback):
        """Runs in the sweep's loop, so the next trial starts only after it returns: it returns once Ray has the CPU
        back. The first trial cannot start whatever its timeout (the CPU is held until it has failed), and the
        second finds both CPUs free, so the outcome does not depend on how fast the machine is."""

        def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
            remove_placement_group(blocker)
            _wait_until(lambda: placement_group_table(blocker)["state"] == "REMOVED"
                        and ray.available_resources().get("CPU", 0.0) >= 2.0)

    summary = _sweep(tmp_path, "qp.n_per_class: {grid: [2, 3]}\n", callbacks=[FreeTheCpuAfterTheFailure()],
                     workers_per_trial=2, worker_start_timeout_s=2.0, max_retries=1)
    first, second = summary.rows  # grid order: trial _00000 draws 2, _00001 draws 3
    assert first.status == "failed" and first.params["qp.n_per_class"] == 2
    assert first.reason.startswith("TrialWorkersFailed: its 2 workers (1 CPU each) could not start")
    assert "within 2 s, 2 attempt(s)" in first.reason
    assert second.status == "ok" and second.params["qp.n_per_class"] == 3, second.reason
    assert "failed: TrialWorkersFailed: its 2 workers" in (summary.output / "table.txt").read_text()
    with (summary.output / "trials.csv").open() as f:
        assert [r["reason"] for r in csv.DictReader(f)] == [first.reason, ""]
    assert json.loads((summary.output / "sweep.json").read_text())["counts"] == {"ok": 1, "stopped": 0, "failed": 1}
    assert summary.chosen is second and (summary.output / "best.yaml").is_file()
    assert _created_placement_groups() == []  # nothing of either trial still holds resources
    assert ray.available_resources().get("CPU") == 2.0


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_through_tune_restore(local_ray, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) after the first trial: the sweep stops, says how to continue, and --resume runs the rest."""
    from ray import tune

    marker = tmp_path / "interrupted"

    class CtrlCAfterTheFirstTrial(tune.Callback):  # stored with the experiment, so it must fire only once
        def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGINT)

    space = "qp.n_per_class: {grid: [2, 3]}\n"
    first = _sweep(tmp_path, space, callbacks=[CtrlCAfterTheFirstTrial()], max_concurrent=1)
    # One trial at a time: the second was not even sampled when the sweep stopped.
    assert first.unfinished == 1 and [r.status for r in first.rows] == ["ok"]
    with pytest.raises(ConfigError, match="already holds a sweep"):
        _sweep(tmp_path, space, max_concurrent=1)
    (done,) = first.rows
    resumed = _sweep(tmp_path, space, resume=True, max_concurrent=1)
    assert resumed.unfinished == 0 and [r.status for r in resumed.rows] == ["ok", "ok"]
    assert resumed.rows[0].trial_id == done.trial_id  # the same experiment, continued
    again = next(r for r in resumed.rows if r.trial_id == done.trial_id)
    assert again.get("seconds") == done.get("seconds")  # the finished trial was kept, not run again
    assert sorted(r.params["qp.n_per_class"] for r in resumed.rows) == [2, 3]


@pytest.mark.slow
def test_the_same_seed_samples_the_same_configurations(local_ray, tmp_path: Path) -> None:
    """Three sweeps of 3 samples: seeds 5, 5 and 6. Every trial fails at once (n_per_class 9 > the 6 features),
    so only the sampling runs."""
    space = ("finetune.l1_maps: {loguniform: [0.5, 20.0]}\nfinetune.lr: {loguniform: [1.0e-3, 2.0e-2]}\n"
             "qp.n_features: {choice: [4, 5, 6]}\nqp.n_per_class: {choice: [9]}\n")

    def sampled(seed: int, out: str) -> list[dict]:
        rows = _sweep(tmp_path, space, out=out, num_samples=3, seed=seed).rows
        assert [r.status for r in rows] == ["failed"] * 3
        return [r.params for r in sorted(rows, key=lambda r: r.trial_id.rsplit("_", 1)[1])]

    a, b, c = sampled(5, "a"), sampled(5, "b"), sampled(6, "c")
    assert a == b
    assert a != c
    assert len({p["finetune.l1_maps"] for p in a}) == 3  # the samples differ from each other
