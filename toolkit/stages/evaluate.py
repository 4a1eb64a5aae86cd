"""Evaluation of a finished run: the interpretability metrics of its three models, explanations, report.md and
report.html.

`evaluate_run(run_dir)` reads what the pipeline wrote (config.yaml, manifest.json -> token stores, probe and dense
checkpoints; checkpoint/ = the DINO-QPM model), runs the models on the cached tokens (no backbone) and computes
`metrics.compute_all` for each:

* validation and test splits, each under its own key ({"val": {...}, "test": {...}} per model): accuracy on every
  image; the map metrics (SID@5, plausibility) on at most `max_map_images` images of each, a seeded draw
  (runtime.seed) recorded under `evaluation` in metrics.json. Validation is what a sweep decides on; test is only
  reported. Without a validation split (data.val_fraction=0) "val" stays null;
* train split (the fit rows the model trained on): the feature metrics (class independence, contrastiveness,
  correlation), as in the paper (docs/method.md#metrics); they do not depend on the evaluation split, so "val"
  and "test" hold the same values.

What each model feeds in (`compute_all` documents the same mapping):

* linear_probe: maps = raw patch tokens (N, D, h, w), weight = the probe's Linear weight (C, D), features = CLS
  tokens. The probe reads CLS, not the patches, so its GradCAM/SID are a comparison baseline, not its explanation.
* dense: maps (N, F, h, w), the dense head weight (C, F), pooled features (N, F).
* dino_qpm: the k selected maps (N, k, h, w), the binary W (C, k) and the raw pooled features of the k selected maps,
  as the reference feeds them (its "final features"); class independence and contrastiveness are unchanged by the
  head's (f − μ)/σ, but the uncentred correlation is not (docs/method.md#differences).
  GradCAM uses W, not W/σ: that is the reference's definition, so plausibility stays comparable with the paper.
  (W/σ would make the GradCAM sum to the logit up to a constant; SID@5 is the same either way for m ≥ 5.)

Every metric key of `REPORTED` is present for every model; a value that is undefined is null (e.g. SID@5 when a
class has fewer than 5 features, plausibility without masks). A metric the data at hand cannot define (it raises
`metrics.MetricUndefined`, e.g. Structural Grounding when no two classes share an attribute) is null with its reason
under the section's "undefined" ({metric: reason}), in the console line and under the report's table; the run goes
on. The pipeline's accuracies are kept; everything is
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
from toolkit.data import EVAL_SPLITS, read_cub_class_attributes
from toolkit.distributed import resolve_device
from toolkit.explain.html import write_html
from toolkit.explain.report import format_metric, metric_label, render_explanations, write_report
from toolkit.files import write_json
from toolkit.metrics import MODELS, REPORTED, SID_K, accuracy, compute_all, feature_part, per_class_accuracy
from toolkit.model import DinoQPM, LinearProbe, load_checkpoint
from toolkit.runs import Run, load_run
from toolkit.train import evaluate, reads_patches, store_maps

BATCH = 256
FROM_RUN = "run"  # `max_map_images` default: the run's own `evaluate.map_images`


def model_outputs(model: torch.nn.Module, store: TokenStore, *,
                  keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Logits (N, C), head inputs (N, F') and the maps of the `keep` rows (len(keep), F', h, w) of a cached split.

    Features: CLS for the probe (what its head reads), the pooled maps for the dense and QPM models (for QPM the k
    selected ones, before the head's (f − μ)/σ, as the reference). Maps of the probe are the raw patch tokens.
    """
    dev = next(model.parameters()).device
    out = evaluate(model, store.dataset(patch=reads_patches(model)), batch_size=BATCH, device=dev,
                   head_inputs=isinstance(model, LinearProbe))
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


def evaluate_model(model: torch.nn.Module, run: Run, split: Any, keep: np.ndarray, train_features: np.ndarray,
                   attributes: np.ndarray | None = None,
                   feature_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics of one model on one evaluation split (`run.val` or `run.test`: accuracy and maps); the feature
    metrics read `train_features`, (N_fit, F') of the fit rows, or are `feature_metrics` (`metrics.feature_part`
    of this model's other split: the same train features give the same values)."""
    logits, _, maps = model_outputs(model, split, keep=keep)
    y = split.labels
    masks = split.masks
    out = compute_all(logits=logits[keep], labels=y[keep], maps=maps, features=train_features,
                      head_weight=head_weight(model), masks=None if masks is None else masks[keep], k=SID_K,
                      seed=run.cfg.runtime.seed, feature_labels=run.fit.labels, class_attributes=attributes,
                      feature_metrics=feature_metrics)
    out["accuracy"] = accuracy(logits, y)
    # Keyed by class name (null for a class without images), so nobody has to know the label order.
    out["per_class_accuracy"] = {name: None if np.isnan(a) else float(a) for name, a in
                                 zip(split.classes, per_class_accuracy(logits, y, n_classes=logits.shape[1]))}
    for key, _ in REPORTED:
        out.setdefault(key, None)
    return out


def _load(path: Path, device: torch.device) -> torch.nn.Module:
    model, _ = load_checkpoint(path)
    return model.to(device)


def evaluate_run(run_dir: Path, *, max_map_images: int | None | str = FROM_RUN,
                 console: Console | None = None) -> dict[str, Any]:
    """Metrics of the run's three models on validation and test merged into run_dir/metrics.json, explanations and
    report.md.

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
    splits = {"val": run.val, "test": run.test} if run.val is not None else {"test": run.test}
    keeps = {name: map_subset(len(split), max_map_images, run.cfg.runtime.seed) for name, split in splits.items()}
    device = resolve_device(run.cfg.runtime)
    console.log("evaluate: " + "; ".join(
        f"{name}: accuracy on {len(split)} images, SID@{SID_K}/plausibility on {keeps[name].size}"
        + ("" if keeps[name].size == len(split) else f" (seeded draw, seed {run.cfg.runtime.seed})")
        for name, split in splits.items()) + f"; feature metrics on the {len(run.fit)} train images trained on"
        + ("" if run.val is not None else "; no validation split (data.val_fraction=0)"))
    models = {"linear_probe": _load(run.stage_dir("probe") / "checkpoint", device),
              "dense": _load(run.stage_dir("dense") / "checkpoint", device),
              "dino_qpm": _load(run_dir / "checkpoint", device)}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    attributes = class_attributes(run)
    for name, model in models.items():
        _, train_features, _ = model_outputs(model, run.fit)
        shared = None  # the feature metrics of the train features: computed with the first split, then reused
        for split_name, split in splits.items():
            new = evaluate_model(model, run, split, keeps[split_name], train_features, attributes, shared)
            shared = feature_part(new) if shared is None else shared
            section = metrics.setdefault(name, {}).get(split_name) or {}
            old = section.get("accuracy")
            if old is not None and abs(old - new["accuracy"]) > 1e-9:
                console.warn(f"{name}: recomputed {split_name} accuracy {new['accuracy']:.4f} differs from the "
                             f"pipeline's {old:.4f}; keeping the pipeline's")
            section.pop("undefined", None)  # reasons of an earlier evaluation; this one's come with `new`
            section.update({k: v for k, v in new.items() if not (k == "accuracy" and old is not None)})
            metrics[name][split_name] = section
            why = section.get("undefined", {})
            console.log(f"evaluate {name} ({split_name}): "
                        + ", ".join(f"{k}={format_metric(section.get(k))}" + (f" ({why[k]})" if k in why else "")
                                    for k, _ in REPORTED))
    metrics["evaluation"] = {"val_images": len(run.val) if run.val is not None else 0, "test_images": len(run.test),
                             "map_images": int(keeps["test"].size),
                             "val_map_images": int(keeps["val"].size) if "val" in keeps else 0,
                             "map_images_seed": run.cfg.runtime.seed, "feature_split": "train (fit rows)",
                             "train_images": len(run.fit), "sid_k": SID_K, "plausibility": "gradcam_dilated",
                             "qpm_gradcam_weight": "binary W (reference definition)",
                             "masks": run.test.masks is not None,
                             "structural_grounding": "cub class attributes" if attributes is not None else None}
    write_json(run_dir / "metrics.json", metrics)
    qpm = models["dino_qpm"]
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
        for split in EVAL_SPLITS:
            sec = metrics[name].get(split)
            print(f"  {name} ({split}): " + (", ".join(f"{metric_label(k, label)}={format_metric(sec.get(k))}"
                                                       for k, label in REPORTED) if sec else "no validation split"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
