"""The stage graph: tokens -> linear probe | dense -> QP -> fine-tune -> evaluation, every stage content-hashed.

`run_pipeline(cfg)` chains the stages through `toolkit.artifacts` (a stage whose inputs did not change is loaded,
not recomputed) and writes a run directory that explains itself:
    config.yaml     the fully resolved configuration
    manifest.json   per stage: artefact key and directory, whether it was cached, seconds, metrics; the validation
                    split (fraction, seed, size)
    metrics.json    per model (linear_probe, linear_probe_dinov2, dense, dino_qpm) its metrics on the validation
                    split and on the test split, {"val": {...}, "test": {...}} ("val" null when data.val_fraction=0),
                    the validation split under "validation", and the QP certificate under "qp_certificate"
    checkpoint/     the self-contained DINO-QPM model (safetensors + JSON)
    log.txt         what the console printed
    run.lock        held by the live job (pid, host, start time); empty after a clean end (toolkit.runlock)
    tensorboard/    per-stage training curves as TensorBoard event files (rank 0, when tensorboardX is installed)
    report.md, report.html, explanations/   the evaluation's report (toolkit.stages.evaluate)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit.artifacts import was_cached
from toolkit.cache import holdout_views, loader_options
from toolkit.config import ConfigError, RunConfig, dump_config, load_config, to_dict
from toolkit.console import Console
from toolkit.data import EVAL_SPLITS, SPLITS, holdout, load_dataset
from toolkit.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    deepspeed_requested,
    init_distributed,
    rank_layout,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_threads,
)
from toolkit.files import DiskFullError, atomic_write_text, disk_full, is_disk_full, write_json
from toolkit.model import Backbone, create_backbone
from toolkit.runlock import RunLock
from toolkit.stages.dense import DenseResult, run_dense
from toolkit.stages.evaluate import evaluate_run
from toolkit.stages.finetune import run_finetune
from toolkit.stages.probe import run_probe
from toolkit.stages.probe_dinov2 import run_probe_dinov2
from toolkit.stages.select import SelectionResult, run_select
from toolkit.stages.tokens import build_tokens, live_split
from toolkit.train import Split, TrainContext, make_engine_factory
from toolkit.train.loop import local_evaluation
from toolkit.train.tensorboard import chain, epoch_logger


@dataclass
class PipelineResult:
    run_dir: Path
    metrics: dict[str, Any]
    stages: dict[str, dict[str, Any]]
    backbone_builds: int  # how many times the backbone was constructed (0 when every token store was cached)


# Settings that change where or how a run executes, not what it computes: a resumed run, or the same config from
# another checkout or output folder, is the same run.
_EXECUTION_ONLY = {"runtime": ("resume", "progress", "output_dir", "run_name", "collective_timeout_s", "num_workers",
                               "pin_memory", "preempt_grace_s", "threads"),
                   "cache": ("root",)}


def _identity(cfg: RunConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    for section, keys in _EXECUTION_ONLY.items():
        for k in keys:
            d[section].pop(k, None)
    if cfg.runtime.deepspeed_config is not None:  # what the engine reads, not where the file lives
        path = Path(cfg.runtime.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"config key 'runtime.deepspeed_config': file {path} not found; point it at a DeepSpeed "
                              "JSON (a copy of toolkit/train/ds_config.json), or leave it null for that default")
        d["runtime"]["deepspeed_config"] = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return d


def config_hash(cfg: RunConfig) -> str:
    """12 hex digits over everything the run computes (not where it runs or writes)."""
    return hashlib.sha256(json.dumps(_identity(cfg), sort_keys=True).encode()).hexdigest()[:12]


def run_dir_for(cfg: RunConfig, preset: str | None = None) -> Path:
    """`runtime.output_dir / runtime.run_name`, or `<preset or dataset>-<config hash>` when no name is set, so the
    same config always lands in the same directory and any other config gets its own."""
    name = cfg.runtime.run_name or f"{preset or cfg.data.dataset}-{config_hash(cfg)}"
    return Path(cfg.runtime.output_dir) / name


def check_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse a directory that holds a run of a different configuration (only possible with a pinned run_name)."""
    old = run_dir / "config.yaml"
    if old.is_file() and _identity(load_config(old)) != _identity(cfg):
        raise FileExistsError(f"{run_dir} already holds a run with a different config; nothing was overwritten. "
                              "Leave runtime.run_name unset (each config gets its own directory), choose another "
                              "name, or delete that directory.")


# Where a run may stop (`--until`), in stage order; evaluate = everything.
UNTIL = ("tokens", "dense", "select", "finetune", "evaluate")
_RENAMED = {"qp": "select"}  # old --until values


def check_until(until: str) -> None:
    """Refuse an unknown `until`, naming the new value of a renamed stage.

    Raises:
        ValueError: `until` is not one of `UNTIL`.
    """
    if until in _RENAMED:
        raise ValueError(f"--until {until} is now --until {_RENAMED[until]} (the selection stage is called "
                         f"'{_RENAMED[until]}' everywhere: stages/select.py, its artefacts and manifest entry)")
    if until not in UNTIL:
        raise ValueError(f"--until must be one of {', '.join(UNTIL)}, got {until!r}")


def run_pipeline(cfg: RunConfig, *, until: str = "evaluate", preset: str | None = None,
                 on_epoch: Callable[[str, dict[str, float]], None] | None = None) -> PipelineResult:
    """Run every stage (or up to `until`, one of `UNTIL`) and write the run directory.

    Args:
        preset: name of the YAML preset, used in the default run directory name (`<preset>-<config hash>`).
        on_epoch: called as `on_epoch(stage, metrics)` after each training epoch that actually runs (not for
            cached stages).

    The datasets are opened before anything is written, so a wrong `data.root` fails without leaving a directory;
    a run whose first stage fails removes the directory it created.
    """
    check_until(until)
    info = init_distributed(cfg.runtime)
    run_dir = run_dir_for(cfg, preset)
    check_run_dir(cfg, run_dir)
    datasets = {split: load_dataset(cfg.data, split) for split in SPLITS}
    created = not run_dir.exists()
    barrier()  # every rank has looked before rank 0 creates it
    lock = RunLock(run_dir)
    try:
        _start_run_dir(cfg, run_dir, lock, info)
        stages: dict[str, dict[str, Any]] = {}
        try:
            return _run_stages(cfg, run_dir, datasets, stages, info=info, until=until, on_epoch=on_epoch)
        except BaseException as e:
            if created and not stages and info.is_main:
                shutil.rmtree(run_dir, ignore_errors=True)
            if is_disk_full(e) and not isinstance(e, DiskFullError):
                assert isinstance(e, OSError)
                raise disk_full(e, run_dir, "the run directory", "Free space there (or set runtime.output_dir to "
                                "a bigger disk) and rerun the same command: finished stages are loaded from the "
                                "cache") from e
            raise
    finally:
        lock.release()


def _start_run_dir(cfg: RunConfig, run_dir: Path, lock: RunLock, info: DistInfo) -> None:
    """Rank 0 takes the run directory's lock (`toolkit.runlock`) and writes config.yaml; every rank learns whether
    that worked, so none waits in a collective for a rank 0 that stopped."""
    failure: BaseException | None = None
    if info.is_main:
        taken_over: list[str] = []
        try:  # one live job per run directory; a killed job's directory is taken over
            lock.acquire(log=taken_over.append)
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", dump_config(cfg))  # never half a config, even on a full disk
            for line in taken_over:
                Console(progress=False, log_file=run_dir / "log.txt").log(line)
        except OSError as e:
            failure = disk_full(e, run_dir, "the run directory", "Free space there (or set runtime.output_dir to "
                                "a bigger disk) and rerun") if is_disk_full(e) else e
    message = broadcast_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"rank 0 could not start the run: {message}")
    barrier()


def _run_stages(cfg: RunConfig, run_dir: Path, datasets: dict[str, Any], stages: dict[str, dict[str, Any]], *,
                info: DistInfo, until: str,
                on_epoch: Callable[[str, dict[str, float]], None] | None) -> PipelineResult:
    console = Console(progress=cfg.runtime.progress, log_file=run_dir / "log.txt")
    device = resolve_device(cfg.runtime)
    precision = resolve_precision(cfg.runtime, device)
    engine = (f"deepspeed (ZeRO stage {cfg.runtime.zero_stage})" if deepspeed_requested(cfg.runtime)
              else "ddp" if info.world_size > 1 else "one process")
    layout = rank_layout(device)
    nodes = len({r["node"] for r in layout})
    threads = set_threads(cfg.runtime)
    console.log(f"world_size={info.world_size} nodes={nodes} backend={info.backend} device={device} "
                f"threads={threads} precision={precision} engine={engine} toolkit={__version__} run_dir={run_dir}")
    root = Path(cfg.cache.root)
    on_epoch = chain(on_epoch, epoch_logger(run_dir, is_main=info.is_main, console=console))  # curves -> TensorBoard
    options = loader_options(cfg.runtime.num_workers, cfg.runtime.pin_memory, device)
    engines: dict[str, str] = {}

    def on_engine(stage: str, description: str) -> None:
        engines[stage] = description
        console.log(f"{stage}: engine {description}")

    ctx = TrainContext(console=console, device=device, seed=cfg.runtime.seed, grad_accum=cfg.runtime.grad_accum,
                       make_engine=make_engine_factory(cfg.runtime, device, precision),
                       checkpoint_every=cfg.runtime.checkpoint_every, resume=cfg.runtime.resume,
                       on_epoch=on_epoch, on_engine=on_engine, loader_options=options)
    builds = [0]
    backbone: list[Backbone] = []

    def get_backbone() -> Backbone:
        if not backbone:
            builds[0] += 1
            seed_everything(cfg.runtime.seed)  # random-init backbones (weights=none) depend on it
            backbone.append(create_backbone(cfg.backbone, cfg.data.image_size,
                                            model_kwargs=cfg.backbone.arch_overrides()).to(device))
        return backbone[0]

    hold = holdout(datasets["train"].labels, cfg.data.val_fraction, cfg.data.seed)
    console.log("validation: " + (f"{len(hold.val)} of {len(datasets['train'])} train images held out "
                                  f"(data.val_fraction={hold.fraction:g}, seed {hold.seed}, class-stratified); every "
                                  "stage trains on the other "
                                  f"{len(hold.fit)}" if hold.held_out else "nothing held out (data.val_fraction=0): "
                                  "every stage trains on all train images and no validation metrics exist"))

    def record(name: str, directory: Path, key: str, metrics: dict[str, Any], t0: float) -> None:
        stages[name] = {"key": key, "directory": str(directory), "cached": was_cached(directory),
                        "seconds": round(time.perf_counter() - t0, 3), "metrics": metrics}
        if info.is_main:
            # "engine" names what trained (the training stages' engines; a cached stage trained nothing now).
            write_json(run_dir / "manifest.json", {
                "config_hash": config_hash(cfg), "world_size": info.world_size, "nodes": nodes, "ranks": layout,
                "backend": info.backend,
                "device": str(device), "precision": precision, "engine": engine, "stage_engines": engines,
                "validation": hold.describe(), "stages": stages})

    stores: dict[str, Split] = {}
    for split in SPLITS:
        t0 = time.perf_counter()
        dataset = datasets[split]
        if cfg.cache.mode == "live":
            stores[split] = live_split(cfg.data, cfg.backbone, split, dataset, seed=cfg.runtime.seed,
                                       backbone=get_backbone())
            continue
        stores[split] = build_tokens(cfg.data, cfg.backbone, cfg.cache, split, dataset, seed=cfg.runtime.seed,
                                     get_backbone=get_backbone, console=console, loader_options=options)
        record(f"tokens_{split}", stores[split].directory, stores[split].key, {"images": len(dataset)}, t0)
    if cfg.cache.mode == "live":
        ctx = dataclasses.replace(ctx, backbone=get_backbone())
    meta = {"classes": stores["train"].classes, "backbone": cfg.backbone.name,
            "weights_hash": stores["train"].meta["weights"], "image_size": cfg.data.image_size,
            "mean": stores["train"].meta["mean"], "std": stores["train"].meta["std"],
            # min-max is part of the reference preprocessing too; exporters and `explain` read this flag
            "reference_minmax": cfg.data.reference_minmax or cfg.data.preprocess == "reference",
            "preprocess": cfg.data.preprocess,
            "interpolation": stores["train"].meta.get("interpolation", "bicubic"),
            "dataset_variant": stores["train"].meta["variant"],
            "config_hash": config_hash(cfg), "toolkit_version": __version__}
    fit, val = holdout_views(stores["train"], hold)
    splits = {"train": fit, "val": val, "test": stores["test"]}
    metrics: dict[str, Any] = {"validation": hold.describe()}
    if until != "tokens":
        t0 = time.perf_counter()
        probe_dir, probe_metrics = run_probe(**splits, cfg=cfg.probe, ctx=ctx, root=root, meta=meta)
        record("probe", probe_dir, probe_dir.name, probe_metrics, t0)
        metrics["linear_probe"] = by_split(probe_metrics)
        if cfg.probe_dinov2.enabled and cfg.cache.mode == "cached":  # it reads the cached block tokens
            t0 = time.perf_counter()
            p2_dir, p2 = run_probe_dinov2(**splits, cfg=cfg.probe_dinov2, data=cfg.data, ctx=ctx, root=root)
            record("probe_dinov2", p2_dir, p2_dir.name, p2, t0)
            metrics["linear_probe_dinov2"] = {**by_split(p2), **{k: p2[k] for k in ("n_blocks", "avgpool", "lr",
                                                                                    "chosen_on")}}
        t0 = time.perf_counter()
        dense: DenseResult = run_dense(**splits, adapter=cfg.adapter, cfg=cfg.dense, ctx=ctx, root=root, meta=meta)
        record("dense", dense.directory, dense.key, dense.metrics, t0)
        metrics["dense"] = by_split(dense.metrics)
    if until not in ("tokens", "dense"):
        t0 = time.perf_counter()
        sel: SelectionResult = run_select(dense=dense, n_classes=len(stores["train"].classes), cfg=cfg.qp,
                                          root=root, ctx=ctx)
        record("select", sel.directory, sel.key, {"objective": sel.selection.objective}, t0)
        metrics["qp_certificate"] = json.loads(sel.selection.to_json())
        for k in ("selected", "assignment", "weight"):
            metrics["qp_certificate"].pop(k, None)
    if until in ("finetune", "evaluate"):
        t0 = time.perf_counter()
        ft_dir, ft_metrics = run_finetune(dense=dense, selection=sel, **splits, adapter=cfg.adapter,
                                          cfg=cfg.finetune, ctx=ctx, root=root, meta=meta)
        record("finetune", ft_dir, ft_dir.name, ft_metrics, t0)
        metrics["dino_qpm"] = by_split(ft_metrics, ("accuracy", "accuracy_before_finetune"))
        if info.is_main:
            # Copied beside it, then swapped in: a full disk mid-copy leaves the old checkpoint (or none), never half.
            tmp = run_dir / f".checkpoint.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                shutil.copytree(ft_dir / "checkpoint", tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if (run_dir / "checkpoint").exists():
                shutil.rmtree(run_dir / "checkpoint")
            os.replace(tmp, run_dir / "checkpoint")
    if info.is_main:
        write_json(run_dir / "metrics.json", metrics)
        if until == "evaluate" and cfg.cache.mode == "cached":  # interpretability metrics read the token cache
            with local_evaluation():  # rank 0 alone evaluates: every image once, no collective to wait for
                metrics = evaluate_run(run_dir, console=console, max_map_images=cfg.evaluate.map_images)
        if until != "tokens":
            console.log(accuracy_line(metrics))
    barrier()
    return PipelineResult(run_dir=run_dir, metrics=metrics, stages=stages, backbone_builds=builds[0])


def by_split(stage: dict[str, Any], keys: tuple[str, ...] = ("accuracy",)) -> dict[str, Any]:
    """A stage's `val_<key>` / `test_<key>` metrics as metrics.json's {"val": {...} or None, "test": {...}}."""
    return {split: None if stage.get(f"{split}_accuracy") is None else {k: stage.get(f"{split}_{k}") for k in keys}
            for split in EVAL_SPLITS}


def accuracy_line(metrics: dict[str, Any]) -> str:
    """One console line: every model's validation and test accuracy, labelled."""
    models = [k for k, v in metrics.items() if isinstance(v, dict) and "test" in v]
    held = (metrics.get("validation") or {}).get("held_out", False)

    def acc(sec: dict[str, Any] | None) -> str:
        return f"{sec['accuracy']:.4f}" if sec and sec.get("accuracy") is not None else "n/a"

    if not held:
        return ("accuracy (test; nothing held out for validation): "
                + ", ".join(f"{m} {acc(metrics[m]['test'])}" for m in models))
    return "accuracy (validation / test): " + ", ".join(f"{m} {acc(metrics[m]['val'])} / {acc(metrics[m]['test'])}"
                                                         for m in models)
