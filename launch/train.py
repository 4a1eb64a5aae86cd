"""Train DINO-QPM end to end: tokens -> linear probe | dense -> QP -> fine-tune -> evaluation.

    python launch/train.py --config configs/demo.yaml [key=value ...]
    deepspeed --num_gpus N launch/train.py --config ... [key=value ...]
    torchrun --nproc_per_node N launch/train.py --config ... [key=value ...]

Only wiring: parse arguments, load the config, run the pipeline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from toolkit.config import ConfigError, load_config  # noqa: E402
from toolkit.pipeline import run_pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML preset (configs/*.yaml); defaults when omitted")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--until", default="evaluate", choices=["tokens", "dense", "qp", "finetune", "evaluate"])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. qp.n_features=50 dense.epochs=5")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (["runtime.resume=true"] if args.resume else [])
    if not any(o.startswith("runtime.deepspeed_config=") for o in overrides):
        overrides.append(f"runtime.deepspeed_config={Path(__file__).with_name('ds_config.json')}")
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_pipeline(cfg, until=args.until)
    print(f"run directory: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
