"""Sweeps: space parsing and validation, Pareto front and choice (fast), and a real 4-trial Ray Tune sweep on the
tiny config that shares its token cache and dense model between trials (slow)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

import tune.runner as runner
from toolkit.config import ConfigError, load_config, replace, save_config
from tune import results as res
from tune.runner import SweepOptions, export_best, prepare, summarize
from tune.space import load_space, override, parse_space, validate_space
from tune.sweep import main, parse_args
from tune.trial import EpochReporter, TrialSetup, trial_config

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
    rep("finetune", {"epoch": 1, "ce": 0.7, "l1_maps": 0.2, "train_accuracy": 0.75})
    metrics, progress = seen[-1]
    assert metrics["train_accuracy"] == 0.75 and metrics["accuracy"] is None and metrics["loss_l1_maps"] == 0.2
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


# ------------------------------------------------------------------------------------ Pareto front, choice


def _row(tid: str, acc: float | None, sid: float | None = None, m: int = 2, status: str = "ok",
         seconds: float = 1.0) -> res.TrialRow:
    return res.TrialRow(trial_id=tid, status=status, params={"qp.n_per_class": m},
                        metrics={"accuracy": acc, "sid_at_5": sid, "qp_n_per_class": m, "seconds": seconds})


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
    assert chosen.trial_id == "b" and "within 0.01" in rule and "0.9500" in rule
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
    assert "accuracy" in table and "SID@5" in table and "[bad] value" in table
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
    ray = pytest.importorskip("ray")
    tmp = tmp_path_factory.mktemp("ray")
    runner._init_ray(SweepOptions(config=TINY, space=tmp, num_samples=1, output=tmp, num_cpus=2))
    yield
    ray.shutdown()


def _sweep(tmp: Path, space: str, **kw: object) -> runner.SweepSummary:
    (tmp / "space.yaml").write_text(space)
    opts = SweepOptions(config=TINY, space=tmp / "space.yaml", num_samples=1, output=tmp / "out", scheduler="fifo",
                        seed=0, overrides=(f"cache.root={tmp / 'artifacts'}", "runtime.progress=false"), **kw)
    return runner.run_sweep(opts)


@pytest.fixture(scope="module")
def tiny_sweep(local_ray, tmp_path_factory: pytest.TempPathFactory) -> tuple[runner.SweepSummary, Path]:
    """One 4-trial FIFO sweep on the tiny config: qp.n_per_class on a grid with one impossible value (9 > the 6
    features), the fine-tune sparsity weight random; two trials at a time, so shared stages are contended."""
    tmp = tmp_path_factory.mktemp("sweep")
    space = "finetune.l1_maps: {loguniform: [0.5, 5.0]}\nqp.n_per_class: {grid: [1, 2, 3, 9]}\n"
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
    for col in ("accuracy", "SID@5", "plausibility", "QP gap", "time (s)", "n_per_class"):
        assert col in table
    with (out / "trials.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert sorted(r["status"] for r in csv_rows) == ["failed", "ok", "ok", "ok"]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in csv_rows if r["status"] == "ok")
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
    assert sorted(r.params["qp.n_per_class"] for r in summary.rows if r.status == "ok") == [1, 2, 3]
    assert "got 9" in (summary.output / "table.txt").read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_workers_per_trial_train_with_ray_train_and_deepspeed(local_ray, tmp_path: Path) -> None:
    """--workers-per-trial 2: the trial runs a TorchTrainer (Train V2) whose 2 gloo workers run the pipeline with
    the DeepSpeed engine; per-epoch reports reach Tune through TuneReportCallback."""
    summary = _sweep(tmp_path, "qp.n_per_class: {grid: [2]}\n", workers_per_trial=2, cpus_per_trial=1)
    (row,) = summary.rows
    assert row.status == "ok", row.reason
    assert row.iterations == load_config(TINY).finetune.epochs + 1
    run_dir = Path(row.get("run_dir"))
    assert load_config(run_dir / "config.yaml").runtime.engine == "deepspeed"
    assert "world_size=2" in (run_dir / "log.txt").read_text()
    assert (summary.output / "best.yaml").is_file()
