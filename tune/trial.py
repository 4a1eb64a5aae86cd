"""What one sweep trial runs: the pipeline on its sampled config, reporting every fine-tune epoch to Tune.

Trials share work through the content-hashed stage artefacts (`toolkit.artifacts.get_or_run` holds a file lock per
key, so trials that start together compute a shared stage once and the others wait and load it). Each trial only
changes what its sampled keys feed, so a sweep over QP and fine-tune settings extracts tokens and trains the dense
model once.

Reports: one per fine-tune epoch (the scheduler's signal, `epoch_val_accuracy`: the DINO-QPM model's accuracy on the
run's validation split after that epoch) and a final one with the validation metrics every decision reads
(`val_accuracy`, `val_sid_at_5`, ...), the same metrics on test (`test_accuracy`, ...: for reading, never for
deciding), the QP certificate and the shared-work counters.
The training-iteration count is therefore the same for every trial (fine-tune epochs + 1), whichever trial happened
to train the shared dense model, which is what ASHA's rungs need. Every report carries a checkpoint: per epoch a
small progress record, at the end the trial's DINO-QPM checkpoint with its metrics and config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # the base class of Tune callbacks; without Ray the sweep cannot run, but the rest of this module can be imported
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover
    _TuneCallback = object  # type: ignore[assignment,misc]

from toolkit.config import ConfigError, RunConfig, replace
from toolkit.data import EVAL_SPLITS
from tune.space import overrides_of

STAGES = ("probe", "dense", "finetune")
# toolkit.artifacts.get_or_run logs "<stage>: built in ..." when this process built the artefact, and "cached" or
# "built by another process" when it loaded one; the run's log.txt therefore says which token stores a trial made.
_TOKENS_BUILT = re.compile(r"\btokens: built in ")
# Interpretability metrics read from metrics.json's "dino_qpm" section (per split) when the evaluate stage wrote them.
INTERP_KEYS = ("sid_at_5", "plausibility", "class_independence", "contrastiveness", "correlation",
               "structural_grounding")
# Keys present in every report (Tune checks that the scheduler's and searcher's metrics are in each result). Both
# are validation metrics: a sweep never decides on test.
SCHEDULER_METRIC = "epoch_val_accuracy"  # ASHA: DINO-QPM validation accuracy after each fine-tune epoch
SEARCH_METRIC = "val_accuracy"  # Optuna: the final validation accuracy (None in the per-epoch reports)

Report = Callable[[dict[str, Any], "Path | None"], None]  # (metrics, checkpoint directory or None)
# Ray Train V2 reads these from the trial driver's environment and passes them to its controller and workers.
_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# Train V2 replaces `print` in its workers by a tee to stdout *and* the root logger, whose console handler prints the
# line again: every toolkit log line appeared twice. Off, a worker's print goes to its stdout once.
_PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
PLACEMENT_GROUP_FILE = "worker_placement_group"  # in <output>/ray-train/trial-<id>/: the workers' placement group id


class TrialWorkersFailed(RuntimeError):
    """A multi-worker trial's Ray Train run failed: its workers could not start, or one of them raised or died."""


@dataclass(frozen=True, kw_only=True)
class TrialSetup:
    """Everything a trial needs besides its sample; pickled to the trial's process by `tune.with_parameters`."""

    base: RunConfig  # the sweep's config (fixed space values applied, paths absolute)
    output: str  # the sweep's output folder (absolute): trials write runs/<trial name>/ under it
    workers: int = 1  # > 1: Ray Train TorchTrainer with this many workers per trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    cwd: str | None = None  # the sweep's working directory: trials run there, as launch/train.py would
    max_retries: int = 1  # workers > 1: new worker groups after a failed start (then the trial fails)
    start_timeout_s: float = 600.0  # workers > 1: how long one start waits for the workers' resources

    def worker_resources(self) -> dict[str, float]:
        """What one Ray Train worker asks Ray for (a worker is one process: 1 CPU is what it uses with
        OMP_NUM_THREADS=1)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}


def train_dir(output: str | Path, trial_id: str) -> Path:
    """Ray Train's storage folder of one multi-worker trial (<output>/ray-train/trial-<id>)."""
    return Path(output) / "ray-train" / f"trial-{trial_id}"


def trial_config(setup: TrialSetup, sample: dict[str, Any], trial_id: str) -> RunConfig:
    """The trial's config: base + sampled keys + its own run directory. Raises ConfigError when impossible."""
    overrides = [*overrides_of(sample), f"runtime.output_dir={Path(setup.output) / 'runs'}",
                 f"runtime.run_name=trial-{trial_id}", "runtime.progress=false"]
    if setup.workers > 1 and setup.base.runtime.engine == "auto":
        overrides.append("runtime.engine=deepspeed")  # the same engine as `deepspeed launch/train.py`
    cfg = replace(setup.base, overrides)
    if cfg.data.val_fraction == 0:  # a sampled data.val_fraction: the sweep itself refuses a base without one
        raise ConfigError("config key 'data.val_fraction': a sweep trial needs a validation split to be ranked on; "
                          "sample values > 0")
    return cfg


def backbone_passes(run_dir: Path) -> int:
    """Token stores (backbone passes over a split) this trial extracted itself: 0, 1 or 2."""
    log = run_dir / "log.txt"
    return len(_TOKENS_BUILT.findall(log.read_text())) if log.is_file() else 0


class EpochReporter:
    """The pipeline's `on_epoch` hook: counts which training loops ran here and reports fine-tune epochs."""

    def __init__(self, report: Report, *, is_main: bool, run_dir: Path | None = None) -> None:
        self.report = report
        self.is_main = is_main
        self.run_dir = run_dir
        self.trained = dict.fromkeys(STAGES, 0)  # 1 when this trial ran that stage's training loop
        self.last: dict[str, float] = {}

    def counters(self) -> dict[str, int]:
        """Shared-work counters, in every report so that trials stopped early count too."""
        passes = backbone_passes(self.run_dir) if self.run_dir is not None else 0
        return {"backbone_passes": passes, **{f"trained_{k}": v for k, v in self.trained.items()}}

    def __call__(self, stage: str, metrics: dict[str, float]) -> None:
        self.trained[stage] = 1
        if stage != "finetune":  # dense/probe run in only one of the trials that share them: not a common clock
            return
        self.last = metrics
        out = {"epoch": int(metrics["epoch"]), SCHEDULER_METRIC: float(metrics["val_accuracy"]),
               SEARCH_METRIC: None, "train_accuracy": float(metrics["train_accuracy"]),
               **{f"loss_{k}": float(v) for k, v in metrics.items()
                  if k not in ("epoch", "train_accuracy", "val_accuracy")}, **self.counters()}
        with tempfile.TemporaryDirectory(prefix="progress-") as tmp:
            if self.is_main:
                (Path(tmp) / "progress.json").write_text(json.dumps({"stage": stage, **out}, indent=2))
            self.report(out, Path(tmp) if self.is_main else None)


def final_metrics(cfg: RunConfig, metrics: dict[str, Any], stages: dict[str, Any], *, reporter: EpochReporter,
                  backbone_builds: int, seconds: float, run_dir: Path) -> dict[str, Any]:
    """The trial's last report: flat scalars from metrics.json, every metric under `val_<key>` and `test_<key>`
    (an interpretability key is None when it is absent)."""
    ft_train = stages.get("finetune", {}).get("metrics", {}).get("train_accuracy")
    qp = metrics.get("qp_certificate", {})
    out: dict[str, Any] = {
        SCHEDULER_METRIC: reporter.last.get("val_accuracy"),
        "train_accuracy": float(reporter.last.get("train_accuracy", ft_train or 0.0)),
        "qp_n_features": cfg.qp.n_features, "qp_n_per_class": cfg.qp.n_per_class,
        **{f"qp_{k}": qp.get(k) for k in ("objective", "bound", "gap", "status", "seconds", "solver")},
        "backbone_builds": backbone_builds, **reporter.counters(),
        "seconds": round(seconds, 3), "run_dir": str(run_dir),
    }
    for split in EVAL_SPLITS:
        qpm = metrics.get("dino_qpm", {}).get(split) or {}
        out.update({f"{split}_accuracy": qpm.get("accuracy"),
                    f"{split}_accuracy_before_finetune": qpm.get("accuracy_before_finetune"),
                    f"dense_{split}_accuracy": (metrics.get("dense", {}).get(split) or {}).get("accuracy"),
                    f"probe_{split}_accuracy": (metrics.get("linear_probe", {}).get(split) or {}).get("accuracy"),
                    **{f"{split}_{k}": qpm.get(k) for k in INTERP_KEYS}})
    return out


def execute(cfg: RunConfig, report: Report, *, is_main: bool) -> dict[str, Any]:
    """Run the pipeline for one trial (in this process, or as one Ray Train worker) and send the final report."""
    from toolkit.pipeline import run_pipeline  # imported in the trial's process, after Ray has set threads

    t0 = time.perf_counter()
    reporter = EpochReporter(report, is_main=is_main,
                             run_dir=Path(cfg.runtime.output_dir) / (cfg.runtime.run_name or ""))
    result = run_pipeline(cfg, on_epoch=reporter)
    final = final_metrics(cfg, result.metrics, result.stages, reporter=reporter,
                          backbone_builds=result.backbone_builds, seconds=time.perf_counter() - t0,
                          run_dir=result.run_dir)
    with tempfile.TemporaryDirectory(prefix="final-") as tmp:
        ckpt = Path(tmp)
        if is_main:
            if (result.run_dir / "checkpoint").is_dir():
                shutil.copytree(result.run_dir / "checkpoint", ckpt / "checkpoint")
            for name in ("metrics.json", "config.yaml"):
                if (result.run_dir / name).is_file():
                    shutil.copy2(result.run_dir / name, ckpt / name)
        report(final, ckpt if is_main else None)
    return final


def _tune_report(metrics: dict[str, Any], directory: Path | None) -> None:
    from ray import tune

    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(directory)) if directory else None)


def _train_report(metrics: dict[str, Any], directory: Path | None) -> None:
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)) if directory else None)


def _enter(cwd: str | None) -> None:
    """Run in the sweep's working directory: Tune and Train start processes in their own folders, but relative
    paths the toolkit uses itself (the converted-weights cache .cache/weights) must resolve as for launch/train.py,
    so every trial shares them."""
    if cwd and Path(cwd).is_dir():
        os.chdir(cwd)


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the process group is already up (gloo/nccl), the toolkit joins it."""
    import ray.train
    from ray.util import get_current_placement_group

    _enter(config["cwd"])
    rank0 = ray.train.get_context().get_world_rank() == 0
    pg = get_current_placement_group()
    if rank0 and pg is not None:
        # The sweep removes this placement group if the trial ends while it still exists (see ReleaseWorkers).
        path = Path(config["pg_file"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pg.id.hex())
    execute(config["cfg"], _train_report, is_main=rank0)


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())


def _train_failure(error: Exception, setup: TrialSetup) -> TrialWorkersFailed:
    """One line on why the Ray Train run of a trial failed (Train's own errors are long and wrapped)."""
    import ray
    from ray.train import ControllerError, WorkerGroupError

    from tune.results import failure_reason

    if isinstance(error, ControllerError):
        cause = error.controller_failure
        if type(cause).__name__ == "WorkerGroupStartupTimeoutError":
            free = {k: round(v, 3) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            return TrialWorkersFailed(
                f"its {setup.workers} workers ({_describe(setup.worker_resources())} each) could not start: no free "
                f"resources for them within {setup.start_timeout_s:g} s, {setup.max_retries + 1} attempt(s) "
                f"(free now: {free}); another job holds them, or raise --worker-start-timeout")
        return TrialWorkersFailed(f"Ray Train could not run its workers: {failure_reason(cause)}")
    if isinstance(error, WorkerGroupError) and error.worker_failures:
        rank, cause = sorted(error.worker_failures.items())[0]
        return TrialWorkersFailed(f"worker rank {rank}: {failure_reason(cause)}")
    return TrialWorkersFailed(failure_reason(error))


def run_trial(sample: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable. Impossible settings raise (ConfigError, QP pre-checks) and fail this trial only."""
    from ray import tune

    _enter(setup.cwd)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup, sample, trial_id)
    if setup.workers <= 1:
        execute(cfg, _tune_report, is_main=True)
        return
    # Train V2 pattern (Ray's "Hyperparameter Tuning with Ray Tune" guide): a TorchTrainer inside the function
    # trainable, forwarded by TuneReportCallback; `Result.metrics` of trainer.fit() is None under V2, so nothing is
    # read from it. This process only waits for the workers; the sweep gives it no CPU (see tune.runner).
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ[_START_TIMEOUT_ENV] = str(setup.start_timeout_s)
    os.environ[_PRINT_PATCH_ENV] = "0"
    folder = train_dir(setup.output, trial_id)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg, "cwd": setup.cwd, "pg_file": str(folder / PLACEMENT_GROUP_FILE)},
        scaling_config=ray.train.ScalingConfig(num_workers=setup.workers, use_gpu=setup.gpus_per_worker > 0,
                                               resources_per_worker=setup.worker_resources()),
        run_config=ray.train.RunConfig(
            name=folder.name, storage_path=str(folder.parent), callbacks=[TuneReportCallback()],
            # Bounded retries. Startup failures (no resources within the timeout) retry `max_retries` times. An error
            # in a worker is not retried: the toolkit's errors are deterministic (a bad sampled value), and a retry
            # could start a new worker group after the sweep released this trial's placement group.
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=setup.max_retries),
            # Train's INFO lines (each report with its metrics, worker-group start) repeat what Tune prints.
            logging_config=ray.train.LoggingConfig(log_level="WARNING")))
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise _train_failure(e, setup) from None


class ReleaseWorkers(_TuneCallback):
    """Removes the workers' placement group of every multi-worker trial that has ended.

    When Tune stops a trial early (ASHA) it ends the trial's process, and with it the Ray Train controller, without
    letting Train shut its workers down: their placement group is owned by the sweep's job, so it would hold its
    CPUs until the sweep ends and the next trial's workers could never start. Train's own PlacementGroupCleaner
    cannot help here: it asks Ray's State API, which needs the dashboard that `ray[tune]` does not install. The
    workers' rank 0 writes the group's id to the trial's Train folder; this callback (in the sweep's process)
    removes the group when the trial completes, stops or fails. `released` lists the trial ids it had to release.
    """

    def __init__(self, output: str) -> None:
        self.output = output
        self.released: list[str] = []

    def _release(self, trial: Any) -> None:
        path = train_dir(self.output, trial.trial_id) / PLACEMENT_GROUP_FILE
        if not path.is_file():
            return
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        pg = PlacementGroup(PlacementGroupID(bytes.fromhex(path.read_text().strip())))
        if placement_group_table(pg).get("state") not in (None, "REMOVED"):
            remove_placement_group(pg)
            self.released.append(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)
