"""Train DINO-QPM end to end: tokens -> linear probe | dense -> QP -> fine-tune -> evaluation.

    python launch/train.py --config configs/demo.yaml [key=value ...]
    python launch/train.py --config configs/demo.yaml dense.lr=1e-3 --dry-run   # validate and show, run nothing
    deepspeed --num_gpus N launch/train.py --config ... [key=value ...]
    torchrun --nproc_per_node N launch/train.py --config ... [key=value ...]
    dinoqpm-train --config ...                                                   # the same, once installed

Only wiring: parse arguments, load the config, run the pipeline. Exit status: 0 done, 2 bad config or input, 75
preempted (SIGTERM or SIGUSR1; a resume checkpoint is written, rerun with --resume; toolkit.train.preempt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toolkit.config import ConfigError, dump_config, load_config
from toolkit.distributed import dist_info, shutdown_distributed
from toolkit.files import DiskFullError
from toolkit.pipeline import UNTIL, check_until, run_dir_for, run_pipeline
from toolkit.train import DivergedError, preempt


def _until(value: str) -> str:
    try:
        check_until(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML preset (configs/*.yaml); defaults when omitted")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--until", default="evaluate", type=_until, metavar="{" + ",".join(UNTIL) + "}",
                        help="last stage to run (default: evaluate, i.e. all)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, print it resolved and the run directory it would use, then stop")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. qp.n_features=50 dense.lr=1e-3")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (["runtime.resume=true"] if args.resume else [])
    preset = args.config.stem if args.config else None
    try:
        cfg = load_config(args.config, overrides)
        run_dir = run_dir_for(cfg, preset)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dump_config(cfg), end="")
        print(f"# run directory: {run_dir}")
        return 0
    preempt.install(cfg.runtime.preempt_grace_s)
    try:
        result = run_pipeline(cfg, until=args.until, preset=preset)
    except (ConfigError, FileNotFoundError, FileExistsError, DiskFullError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DivergedError as e:  # every rank stops at the same step and says so
        print(f"error: {e}", file=sys.stderr)
        return 3
    except preempt.Preempted:
        if dist_info().is_main:
            print(f"exit status {preempt.PREEMPTED_EXIT} (preempted): rerun with --resume to continue", file=sys.stderr)
        return preempt.PREEMPTED_EXIT
    finally:
        shutdown_distributed()
    if dist_info().is_main:  # one line per run, not one per rank
        print(f"run directory: {result.run_dir}")
        for name in ("report.html", "report.md"):
            if (result.run_dir / name).is_file():
                print(f"report: {result.run_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
