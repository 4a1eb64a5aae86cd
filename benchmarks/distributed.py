"""1 rank vs 2 ranks (DeepSpeed launcher, CPU/gloo or GPUs): dense time per epoch and token-extraction images/s.

    python benchmarks/distributed.py [--per-class 30] [--epochs 3] [key=value ...]

Both runs use the demo backbone and real Fashion-MNIST, each with its own empty artefact cache, side by side in one
invocation. On a 2-core CPU machine two ranks share the same two cores, so expect no speed-up there: the figure
that matters on CPU is that the sharded extraction and the engine add little overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(ranks: int, tmp: Path, overrides: list[str]) -> dict[str, float]:
    bin_dir = Path(sys.executable).parent
    cmd = ([str(bin_dir / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(29700 + ranks)]
           if ranks > 1 else [sys.executable])
    cmd += [str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/demo.yaml"), "--until", "dense",
            f"cache.root={tmp / 'art'}", f"runtime.output_dir={tmp / 'runs'}", "runtime.run_name=bench",
            "runtime.progress=false", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)), PYTHONPATH=str(ROOT))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    stages = json.loads((tmp / "runs" / "bench" / "manifest.json").read_text())["stages"]
    history = json.loads((Path(stages["dense"]["directory"]) / "history.json").read_text())
    tokens = json.loads((Path(stages["tokens_train"]["directory"]) / "manifest.json").read_text())
    n = tokens["metrics"]["images"]
    return {"extract_images_per_s": n / tokens["seconds"],
            "dense_epoch_s": sum(h["seconds"] for h in history) / len(history)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    overrides = [f"data.train_per_class={a.per_class}", "data.test_per_class=5", f"dense.epochs={a.epochs}",
                 "probe.epochs=1", *a.overrides]
    results = {}
    for ranks in (1, 2):
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-dist-{ranks}-"))
        try:
            results[ranks] = run(ranks, tmp, overrides)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'measure':<32}{'1 rank':>12}{'2 ranks':>12}{'2 vs 1':>10}")
    one, two = results[1], results[2]
    print(f"{'token extraction (images/s)':<32}{one['extract_images_per_s']:>12.1f}"
          f"{two['extract_images_per_s']:>12.1f}{two['extract_images_per_s'] / one['extract_images_per_s']:>9.2f}x")
    print(f"{'dense epoch (s)':<32}{one['dense_epoch_s']:>12.2f}{two['dense_epoch_s']:>12.2f}"
          f"{one['dense_epoch_s'] / two['dense_epoch_s']:>9.2f}x")


if __name__ == "__main__":
    main()
