"""Evaluation of a finished run: the interpretability metrics of its three models, explanations, report.md and
report.html.

`evaluate_run(run_dir)` reads what the pipeline wrote (config.yaml, manifest.json -> token stores, probe and dense
checkpoints; checkpoint/ = the DINO-QPM model), runs the models on the cached tokens (no backbone) and computes
`metrics.compute_all` for each:

* test split: accuracy on every image; the map metrics (SID@5, plausibility) on at most `max_map_images` images,
  a seeded draw (runtime.seed) recorded under `evaluation` in metrics.json;
* train split: the feature metrics (class independence, contrastiveness, correlation), as in the paper
  (docs/method.md#metrics).

What each model feeds in (`compute_all` documents the same mapping):

* linear_probe: maps = raw patch tokens (N, D, h, w), weight = the probe's Linear weight (C, D), features = CLS
  tokens. The probe reads CLS, not the patches, so its GradCAM/SID are a comparison baseline, not its explanation.
* dense: maps (N, F, h, w), the dense head weight (C, F), pooled features (N, F).
* qpm: the k selected maps (N, k, h, w), the binary W (C, k) and the raw pooled features of the k selected maps,
  as the reference feeds them (its "final features"); class independence and contrastiveness are unchanged by the
  head's (f − μ)/σ, but the uncentred correlation is not (docs/method.md#differences).
  GradCAM uses W, not W/σ: that is the reference's definition, so plausibility stays comparable with the paper.
  (W/σ would make the GradCAM sum to the logit up to a constant; SID@5 is the same either way for m ≥ 5.)

Every metric key of `REPORTED` is present for every model; a value that is undefined is null (e.g. SID@5 when a
class has fewer than 5 features, plausibility without masks). The pipeline's accuracies are kept; everything is
seeded and no timing goes into metrics.json, so reruns give an identical file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.cache import TokenStore
from toolkit.console import Console
from toolkit.data import read_cub_class_attributes
from toolkit.distributed import resolve_device
from toolkit.explain.html import write_html
from toolkit.explain.report import format_metric, metric_label, render_explanations, write_report
from toolkit.files import write_json
from toolkit.metrics import MODELS, REPORTED, SID_K, accuracy, compute_all, per_class_accuracy
from toolkit.model import DinoQPM, LinearProbe, load_checkpoint
from toolkit.runs import Run, load_run
from toolkit.train import evaluate, store_maps

BATCH = 256
FROM_RUN = "run"  # `max_map_images` default: the run's own `evaluate.map_images`


def model_outputs(model: torch.nn.Module, store: TokenStore, *,
                  keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Logits (N, C), head inputs (N, F') and the maps of the `keep` rows (len(keep), F', h, w) of a cached split.

    Features: CLS for the probe (what its head reads), the pooled maps for the dense and QPM models (for QPM the k
    selected ones, before the head's (f − μ)/σ, as the reference). Maps of the probe are the raw patch tokens.
    """
    dev = next(model.parameters()).device
    out = evaluate(model, store.dataset(), batch_size=BATCH, device=dev, head_inputs=isinstance(model, LinearProbe))
    maps = store_maps(model, store, keep, batch_size=BATCH) if keep is not None and len(keep) else None
    assert out.features is not None
    return out.logits, out.features, maps


def head_weight(model: torch.nn.Module) -> np.ndarray:
    """(C, F') weight that `compute_all` reads: probe Linear, dense Linear or binary W."""
    if isinstance(model, LinearProbe):
        return model.linear.weight.detach().cpu().numpy()
    assert isinstance(model, DinoQPM)
    return model.head_weight().detach().cpu().numpy()


def map_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most `limit` of n images, a seeded draw (all of them when n <= limit or limit is None)."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def class_attributes(run: Run) -> np.ndarray | None:
    """CUB's (C, 312) class-attribute vectors for Structural Grounding, when the run is on CUB and has them."""
    data = run.cfg.data
    if data.dataset != "cub" or not run.cfg.evaluate.structural_grounding or data.root is None:
        return None
    return read_cub_class_attributes(Path(data.root).expanduser())


def evaluate_model(model: torch.nn.Module, run: Run, keep: np.ndarray,
                   attributes: np.ndarray | None = None) -> dict[str, Any]:
    """The metrics of one model (test split for accuracy and maps, train split for features)."""
    logits, _, maps = model_outputs(model, run.test, keep=keep)
    _, train_features, _ = model_outputs(model, run.train)
    y = run.test.labels
    masks = run.test.masks
    out = compute_all(logits=logits[keep], labels=y[keep], maps=maps, features=train_features,
                      head_weight=head_weight(model), masks=None if masks is None else masks[keep], k=SID_K,
                      seed=run.cfg.runtime.seed, feature_labels=run.train.labels, class_attributes=attributes)
    out["accuracy"] = accuracy(logits, y)
    # Keyed by class name (null for a class without test images), so nobody has to know the label order.
    out["per_class_accuracy"] = {name: None if np.isnan(a) else float(a) for name, a in
                                 zip(run.test.classes, per_class_accuracy(logits, y, n_classes=logits.shape[1]))}
    for key, _ in REPORTED:
        out.setdefault(key, None)
    return out


def _load(path: Path, device: torch.device) -> torch.nn.Module:
    model, _ = load_checkpoint(path)
    return model.to(device)


def evaluate_run(run_dir: Path, *, max_map_images: int | None | str = FROM_RUN,
                 console: Console | None = None) -> dict[str, Any]:
    """Metrics of the run's three models merged into run_dir/metrics.json, explanations and report.md.

    Args:
        run_dir: a run directory written by `run_pipeline` (until "finetune" or "evaluate").
        max_map_images: most test images for the map metrics (SID@5, plausibility); a seeded draw above it; None =
            every test image; `FROM_RUN` (the default) = the run's `evaluate.map_images`.
        console: where progress goes (default: a plain console).

    Returns:
        The merged metrics.json content.
    """
    run_dir = Path(run_dir)
    console = console or Console(enabled=True)
    run = load_run(run_dir)
    if max_map_images == FROM_RUN:
        max_map_images = run.cfg.evaluate.map_images
    elif isinstance(max_map_images, str):
        raise ValueError(f"max_map_images must be a number, None or {FROM_RUN!r}, got {max_map_images!r}")
    keep = map_subset(len(run.test), max_map_images, run.cfg.runtime.seed)
    device = resolve_device(run.cfg.runtime)
    console.log(f"evaluate: accuracy on {len(run.test)} test images; SID@{SID_K}/plausibility on {keep.size} of them"
                + ("" if keep.size == len(run.test) else f" (seeded draw, seed {run.cfg.runtime.seed})")
                + f"; feature metrics on {len(run.train)} train images")
    models = {"linear_probe": _load(run.stage_dir("probe") / "checkpoint", device),
              "dense": _load(run.stage_dir("dense") / "checkpoint", device),
              "qpm": _load(run_dir / "checkpoint", device)}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    attributes = class_attributes(run)
    for name, model in models.items():
        new = evaluate_model(model, run, keep, attributes)
        section = metrics.setdefault(name, {})
        if "accuracy" in section and abs(section["accuracy"] - new["accuracy"]) > 1e-9:
            console.warn(f"{name}: recomputed accuracy {new['accuracy']:.4f} differs from the pipeline's "
                         f"{section['accuracy']:.4f}; keeping the pipeline's")
        section.update({k: v for k, v in new.items() if not (k == "accuracy" and "accuracy" in section)})
        console.log(f"evaluate {name}: " + ", ".join(f"{k}={format_metric(section.get(k))}" for k, _ in REPORTED))
    metrics["evaluation"] = {"test_images": len(run.test), "map_images": int(keep.size),
                             "map_images_seed": run.cfg.runtime.seed, "feature_split": "train",
                             "train_images": len(run.train), "sid_k": SID_K, "plausibility": "gradcam_dilated",
                             "qpm_gradcam_weight": "binary W (reference definition)",
                             "masks": run.test.masks is not None,
                             "structural_grounding": "cub class attributes" if attributes is not None else None}
    write_json(run_dir / "metrics.json", metrics)
    qpm = models["qpm"]
    assert isinstance(qpm, DinoQPM)
    t0 = time.perf_counter()
    views = render_explanations(qpm, run, run_dir / "explanations", console=console)
    write_report(run_dir, metrics, views)
    write_html(run_dir)
    console.log(f"evaluate: report.md and report.html written in {time.perf_counter() - t0:.1f}s")
    return metrics


def _map_images(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of images or 'all', got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dinoqpm-evaluate",
                                     description="Metrics, explanations and report.md of a finished run.")
    parser.add_argument("--run", required=True, type=Path, help="run directory written by the pipeline")
    parser.add_argument("--max-map-images", type=_map_images, default=None,
                        help="most test images for SID@5 and plausibility (seeded draw above it), or 'all'; default: "
                             "the run's evaluate.map_images")
    args = parser.parse_args(argv)
    limit = FROM_RUN if args.max_map_images is None else None if args.max_map_images == "all" else args.max_map_images
    try:
        metrics = evaluate_run(args.run, max_map_images=limit)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.run / 'metrics.json'}, {args.run / 'report.md'}, {args.run / 'report.html'} and "
          f"{args.run / 'explanations'}/")
    for name in MODELS:
        print(f"  {name}: " + ", ".join(f"{metric_label(k, label)}={format_metric(metrics[name].get(k))}"
                                        for k, label in REPORTED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
