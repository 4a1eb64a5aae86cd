"""N sweep trials sharing their upstream stages vs the same N trials each from scratch (separate cache roots).

    python benchmarks/sweep.py [--config configs/tiny.yaml] [--space SPACE] [--num-trials 4] [--cpus-per-trial 1]
                               [key=value ...]

Both runs go through Ray Tune with the FIFO scheduler on one local Ray instance (started once and warmed up by two
trials that only import the toolkit, not timed), with the
same trial configs: the shared run is a normal `tune/sweep.py` sweep (one cache root: tokens, linear probe and dense
model are built once); the scratch run replays its sampled configs, each with its own empty cache root, so every
trial extracts tokens and trains the probe and dense model itself. Prints the two wall times side by side, their
ratio, and how many backbone passes and dense trainings each run did.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from toolkit.data import SPLITS
from tune.runner import SweepOptions, _init_ray, prepare, run_sweep
from tune.trial import TrialSetup, run_trial

ROOT = Path(__file__).resolve().parents[1]
# Varies only what comes after the dense model (fine-tune and QP settings), like tune/spaces/default.yaml.
TINY_SPACE = """finetune.l1_maps: {loguniform: [0.5, 5.0]}
finetune.diversity_weight: {uniform: [0.0, 1.0]}
qp.n_features: {choice: [4, 6]}
qp.n_per_class: {choice: [1, 2]}
"""


def _replay(sample: dict[str, Any], setup: TrialSetup) -> None:
    """A scratch trial: the flat sample (with its own cache.root) lives under one grid key."""
    run_trial(sample["trial"], setup)


def _warm(sample: dict[str, Any]) -> None:
    """Imports what a trial imports, so neither timed run pays the first-ever imports from a cold disk cache."""
    from ray import tune

    import toolkit.pipeline  # noqa: F401

    tune.report({"warm": 1})


def warm_up(cpus: float, root: Path) -> None:
    from ray import tune

    trainable = tune.with_resources(_warm, {"cpu": cpus})
    tune.Tuner(trainable, param_space={"i": tune.grid_search([0, 1])},
               run_config=tune.RunConfig(name="warm", storage_path=str(root / "warm"), verbose=0)).fit()


def scratch_run(opts: SweepOptions, samples: list[dict[str, Any]], root: Path) -> tuple[float, list[dict]]:
    """The same trials, each with an empty cache root of its own; returns (seconds, final metrics)."""
    from ray import tune

    base, _, _ = prepare(opts)
    out = root / "scratch"
    setup = TrialSetup(base=base, output=str(out), cwd=os.getcwd())
    trials = [{**s, "cache.root": str(root / "scratch-cache" / str(i))} for i, s in enumerate(samples)]
    trainable = tune.with_resources(tune.with_parameters(_replay, setup=setup), {"cpu": opts.cpus_per_trial})
    t0 = time.perf_counter()
    grid = tune.Tuner(trainable, param_space={"trial": tune.grid_search(trials)},
                      tune_config=tune.TuneConfig(num_samples=1, reuse_actors=True),
                      run_config=tune.RunConfig(name="scratch", storage_path=str(out / "ray"), verbose=0)).fit()
    seconds = time.perf_counter() - t0
    return seconds, [dict(r.metrics or {}) for r in grid]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    p.add_argument("--space", type=Path, help="search space YAML (default: a fine-tune/QP space for the tiny config)")
    p.add_argument("--num-trials", type=int, default=4)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        root = Path(tmp)
        space = a.space
        if space is None:
            space = root / "space.yaml"
            space.write_text(TINY_SPACE)
        opts = SweepOptions(config=a.config, space=space, num_samples=a.num_trials, output=root / "shared",
                            scheduler="fifo", cpus_per_trial=a.cpus_per_trial, seed=a.seed,
                            overrides=(*a.overrides, f"cache.root={root / 'shared-cache'}", "runtime.progress=false"))
        _init_ray(opts)  # once, outside both timings
        warm_up(a.cpus_per_trial, root)
        quiet = Console(file=io.StringIO())
        t0 = time.perf_counter()
        shared = run_sweep(opts, console=quiet)
        t_shared = time.perf_counter() - t0
        done = [r for r in shared.rows if r.status == "ok"]
        if len(done) != len(shared.rows):
            console.print(f"[red]{len(shared.rows) - len(done)} shared trial(s) did not complete[/red]")
            return 1
        t_scratch, scratch = scratch_run(opts, [r.params for r in done], root)
        # Backbone passes per split (token stores extracted / 2 splits) and dense trainings, summed over trials.
        counts = {name: [f"{sum(m.get('backbone_passes') or 0 for m in ms) / len(SPLITS):g}",
                         str(sum(m.get("trained_dense") or 0 for m in ms))]
                  for name, ms in (("shared", [r.metrics for r in done]), ("scratch", scratch))}
    table = Table(title=f"{len(done)} trials, {a.config.name}, {a.cpus_per_trial} CPU per trial, "
                        f"{os.cpu_count()} CPUs")
    for col in ("run", "wall (s)", "backbone passes per split", "dense trainings"):
        table.add_column(col, justify="right")
    table.add_row("shared stages", f"{t_shared:.1f}", *counts["shared"])
    table.add_row("each from scratch", f"{t_scratch:.1f}", *counts["scratch"])
    console.print(table)
    console.print(f"scratch / shared = {t_scratch / t_shared:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
