"""Ray Tune sweep of DINO-QPM sparsity, diversity, QP and fine-tune settings; trials share tokens and dense model.

    python tune/sweep.py --config configs/demo.yaml --space tune/spaces/default.yaml --num-samples 8 \\
        [--scheduler asha|fifo] [--search random|optuna] [--seed S] [--cpus-per-trial C] [--gpus-per-trial G] \\
        [--workers-per-trial W] [--max-retries R] [--worker-start-timeout T] [--output DIR] [--resume] \\
        [--address ADDR | --num-cpus N] [--export-best] [key=value ...]

Every decision (ASHA's cuts, Optuna's search, the Pareto front, the choice) reads the validation split carved from
train (data.val_fraction); test metrics are reported in their own columns, never used to decide.

Writes to DIR: request.json (what was asked for, with the seed), table.txt (the printed table), trials.csv, sweep.json
(Pareto front, rule, shared-work counts), sweep.png (trials on validation accuracy against the interpretability axis,
the front, the chosen trial, stopped and failed trials), best.yaml (the chosen trial's config, loadable by
launch/train.py), runs/trial-*/ (each trial's run directory), ray/ (Tune's own results and checkpoints) and, with
workers, ray-train/ (Ray Train's). A DIR that already holds a sweep is refused (nothing is changed) unless --resume
continues that sweep through Tune's restore. Exit codes: 0 done, 1 no trial completed, 2 bad arguments or config (or DIR
holds another sweep), 3 the ONNX export of the best run failed or is unavailable, 4 interrupted (run the same command
with --resume to finish it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toolkit.config import ConfigError
from tune.runner import SweepOptions, run_sweep


def parse_args(argv: list[str] | None = None) -> SweepOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML preset (configs/*.yaml); defaults when omitted")
    p.add_argument("--space", type=Path, default=Path("tune/spaces/default.yaml"), help="search space YAML")
    p.add_argument("--num-samples", type=int, default=8, help="trials (per grid point when the space has 'grid')")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                   help="asha stops trials whose validation accuracy after a fine-tune epoch lags at a rung; fifo "
                        "runs all to the end")
    p.add_argument("--search", choices=["random", "optuna"], default="random")
    p.add_argument("--cpus-per-trial", type=float,
                   help="CPUs of one trial, all its workers together (default: 1, or 1 per worker)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs of one trial; fractions share a GPU")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="> 1: each trial trains with Ray Train's TorchTrainer and the DeepSpeed engine")
    p.add_argument("--max-retries", type=int, default=1,
                   help="with workers: new worker groups after one could not start, before the trial fails")
    p.add_argument("--worker-start-timeout", type=float, default=600.0,
                   help="with workers: seconds one start waits for free resources for all the trial's workers")
    p.add_argument("--output", type=Path, default=Path("runs/sweep"), help="where the sweep's files go")
    p.add_argument("--resume", action="store_true",
                   help="continue the (interrupted) sweep in --output with Tune's restore; same arguments as before")
    p.add_argument("--address", help="join a running Ray cluster (e.g. auto or host:6379) instead of a local one")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all of this machine's)")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    p.add_argument("--seed", type=int,
                   help="seed of the search algorithm: the same seed samples the same configurations (default: a "
                        "fresh one, printed and kept in request.json)")
    p.add_argument("--grace-period", type=int, help="ASHA: fine-tune epochs before the first cut")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="choice rule: front trials within this accuracy of the best compete on interpretability")
    p.add_argument("--export-best", action="store_true", help="export the chosen run to DIR/best.onnx")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the base config, e.g. dense.epochs=5")
    a = p.parse_args(argv)
    return SweepOptions(config=a.config, space=a.space, num_samples=a.num_samples, output=a.output,
                        overrides=tuple(a.overrides), scheduler=a.scheduler, search=a.search,
                        cpus_per_trial=a.cpus_per_trial, gpus_per_trial=a.gpus_per_trial,
                        workers_per_trial=a.workers_per_trial, address=a.address, num_cpus=a.num_cpus,
                        max_concurrent=a.max_concurrent,
                        seed=a.seed, grace_period=a.grace_period, tolerance=a.tolerance, export_best=a.export_best,
                        resume=a.resume, max_retries=a.max_retries, worker_start_timeout_s=a.worker_start_timeout)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        summary = run_sweep(opts)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.unfinished:
        return 4
    if summary.chosen is None:
        return 1
    if summary.export_rc not in (None, 0):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
