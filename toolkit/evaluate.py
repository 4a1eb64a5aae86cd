"""Evaluation of a finished run: the interpretability metrics of its three models, explanations and report.md.

`evaluate_run(run_dir)` reads what the pipeline wrote (config.yaml, manifest.json -> token stores, probe and dense
checkpoints; checkpoint/ = the DINO-QPM model), runs the models on the cached tokens (no backbone) and computes
`metrics.compute_all` for each:

* test split: accuracy on every image; the map metrics (SID@5, plausibility) on at most `max_map_images` images,
  a seeded draw (runtime.seed) recorded under `evaluation` in metrics.json;
* train split: the feature metrics (class independence, contrastiveness, correlation), as in dino_qpm.md §4.

What each model feeds in (`compute_all` documents the same mapping):

* linear_probe: maps = raw patch tokens (N, D, h, w), weight = the probe's Linear weight (C, D), features = CLS
  tokens. The probe reads CLS, not the patches, so its GradCAM/SID are a comparison baseline, not its explanation.
* dense: maps (N, F, h, w), the dense head weight (C, F), pooled features (N, F).
* qpm: the k selected maps (N, k, h, w), the binary W (C, k) and the head's standardised inputs (f − μ)/σ.
  GradCAM uses W, not W/σ: that is the reference's definition, so plausibility stays comparable with the paper.
  (W/σ would make the GradCAM sum to the logit up to a constant; SID@5 is the same either way for m ≥ 5.)

Every metric key of `REPORTED` is present for every model; a value that is undefined is null (e.g. SID@5 when a
class has fewer than 5 features, plausibility without masks). The pipeline's accuracies are kept; everything is
seeded and no timing goes into metrics.json, so reruns give an identical file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from toolkit.artifacts import write_json
from toolkit.cache import TokenStore
from toolkit.checkpoint import load_checkpoint
from toolkit.config import RunConfig, load_config
from toolkit.data import load_dataset
from toolkit.explain import (
    contrast_explanation,
    explain_tokens,
    global_explanation,
    render_contrast,
    render_global,
    render_local,
)
from toolkit.metrics import accuracy, compute_all, per_class_accuracy
from toolkit.model import DinoQPM, LinearProbe, SparseHead, join_tokens
from toolkit.runtime import Console, resolve_device

MODELS = ("linear_probe", "dense", "qpm")
SID_K = 5
# (metrics.json key, report column); always written for every model, null when undefined.
REPORTED = (("accuracy", "accuracy"), (f"sid_at_{SID_K}", f"SID@{SID_K}"), ("class_independence", "class indep."),
            ("contrastiveness", "contrastiveness"), ("correlation", "correlation (lower = better)"),
            ("plausibility", "plausibility"))
BATCH = 256
N_LOCAL = 3


@dataclass(frozen=True)
class Run:
    """What `evaluate_run` reads from a run directory."""

    directory: Path
    cfg: RunConfig
    stages: dict[str, Any]
    train: TokenStore
    test: TokenStore

    def stage_dir(self, name: str) -> Path:
        return _stage_dir(self.directory, self.stages, name)


def _stage_dir(run_dir: Path, stages: dict[str, Any], name: str) -> Path:
    if name not in stages:
        raise FileNotFoundError(f"{run_dir / 'manifest.json'} has no stage {name!r}: run the pipeline to the end "
                                "first")
    return Path(stages[name]["directory"])


def load_run(run_dir: Path) -> Run:
    """Config, manifest and token stores of a run; clear errors when something is missing."""
    for name in ("config.yaml", "manifest.json", "metrics.json", "checkpoint"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name} is missing: pass a run directory of a completed pipeline run")
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    stores = {}
    for split in ("train", "test"):
        d = _stage_dir(run_dir, stages, f"tokens_{split}")
        if not (d / "meta.json").is_file():
            raise FileNotFoundError(f"token cache {d} is gone; rerun the pipeline to rebuild it")
        stores[split] = TokenStore(d, stages[f"tokens_{split}"]["key"])
    return Run(run_dir, load_config(run_dir / "config.yaml"), stages, stores["train"], stores["test"])


@torch.no_grad()
def model_outputs(model: torch.nn.Module, store: TokenStore, *, keep: np.ndarray | None = None,
                  rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Logits (N, C), features (N, F') and the maps of the `keep` rows (len(keep), F', h, w) of a cached split.

    Features are what the head reads: CLS for the probe, pooled maps for the dense model, (f − μ)/σ for QPM.
    `rows` restricts everything to those samples (in that order). Maps of the probe are the raw patch tokens.
    """
    model.eval()
    dev = next(model.parameters()).device
    idx = np.arange(len(store)) if rows is None else np.asarray(rows)
    keep_set = np.zeros(len(store), dtype=bool)
    if keep is not None:
        keep_set[keep] = True
    h, w = store.grid
    logits, feats, maps = [], [], []
    for start in range(0, len(idx), BATCH):
        part = idx[start:start + BATCH]
        order = np.argsort(part)  # sorted memmap reads
        patch_np = np.asarray(store.patch[part[order]])[np.argsort(order)]
        cls = torch.from_numpy(np.asarray(store.cls[part]).astype(np.float32)).to(dev)
        sel = keep_set[part]
        if isinstance(model, LinearProbe):
            logits.append(model(cls).cpu().numpy())
            feats.append(cls.cpu().numpy())
            if sel.any():
                maps.append(patch_np[sel].transpose(0, 2, 1).reshape(int(sel.sum()), -1, h, w))
            continue
        assert isinstance(model, DinoQPM)
        lg, f, mp = model(join_tokens(torch.from_numpy(patch_np.astype(np.float32)).to(dev), cls))
        if isinstance(model.head, SparseHead):
            f = model.head.standardise(f)
        logits.append(lg.float().cpu().numpy())
        feats.append(f.float().cpu().numpy())
        if sel.any():
            maps.append(mp[torch.from_numpy(sel).to(dev)].float().cpu().numpy())
    out_maps = np.concatenate(maps) if maps else None
    return np.concatenate(logits), np.concatenate(feats), out_maps


def head_weight(model: torch.nn.Module) -> np.ndarray:
    """(C, F') weight that `compute_all` reads: probe Linear, dense Linear or binary W."""
    if isinstance(model, LinearProbe):
        return model.linear.weight.detach().cpu().numpy()
    assert isinstance(model, DinoQPM)
    return model.head_weight().detach().cpu().numpy()


def map_subset(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `limit` of n images, a seeded draw (all of them when n <= limit)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def evaluate_model(model: torch.nn.Module, run: Run, keep: np.ndarray) -> dict[str, Any]:
    """The metrics of one model (test split for accuracy and maps, train split for features)."""
    logits, _, maps = model_outputs(model, run.test, keep=keep)
    _, train_features, _ = model_outputs(model, run.train)
    y = run.test.labels
    masks = run.test.masks
    out = compute_all(logits=logits[keep], labels=y[keep], maps=maps, features=train_features,
                      head_weight=head_weight(model), masks=None if masks is None else masks[keep], k=SID_K,
                      seed=run.cfg.runtime.seed, feature_labels=run.train.labels)
    out["accuracy"] = accuracy(logits, y)
    out["per_class_accuracy"] = [None if np.isnan(a) else float(a)
                                 for a in per_class_accuracy(logits, y, n_classes=logits.shape[1])]
    for key, _ in REPORTED:
        out.setdefault(key, None)
    return out


def _load(path: Path, device: torch.device) -> torch.nn.Module:
    model, _ = load_checkpoint(path)
    return model.to(device)


def evaluate_run(run_dir: Path, *, max_map_images: int = 1000, console: Console | None = None) -> dict[str, Any]:
    """Metrics of the run's three models merged into run_dir/metrics.json, explanations and report.md.

    Args:
        run_dir: a run directory written by `run_pipeline` (until "finetune" or "evaluate").
        max_map_images: most test images for the map metrics (SID@5, plausibility); a seeded draw above it.
        console: where progress goes (default: a plain console).

    Returns:
        The merged metrics.json content.
    """
    run_dir = Path(run_dir)
    console = console or Console(enabled=True)
    run = load_run(run_dir)
    keep = map_subset(len(run.test), max_map_images, run.cfg.runtime.seed)
    device = resolve_device(run.cfg.runtime)
    console.log(f"evaluate: accuracy on {len(run.test)} test images; SID@{SID_K}/plausibility on {keep.size} of them"
                + ("" if keep.size == len(run.test) else f" (seeded draw, seed {run.cfg.runtime.seed})")
                + f"; feature metrics on {len(run.train)} train images")
    models = {"linear_probe": _load(run.stage_dir("probe") / "checkpoint", device),
              "dense": _load(run.stage_dir("dense") / "checkpoint", device),
              "qpm": _load(run_dir / "checkpoint", device)}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name, model in models.items():
        new = evaluate_model(model, run, keep)
        section = metrics.setdefault(name, {})
        if "accuracy" in section and abs(section["accuracy"] - new["accuracy"]) > 1e-9:
            console.warn(f"{name}: recomputed accuracy {new['accuracy']:.4f} differs from the pipeline's "
                         f"{section['accuracy']:.4f}; keeping the pipeline's")
        section.update({k: v for k, v in new.items() if not (k == "accuracy" and "accuracy" in section)})
        console.log(f"evaluate {name}: " + ", ".join(f"{k}={_fmt(section.get(k))}" for k, _ in REPORTED))
    metrics["evaluation"] = {"test_images": len(run.test), "map_images": int(keep.size),
                             "map_images_seed": run.cfg.runtime.seed, "feature_split": "train",
                             "train_images": len(run.train), "sid_k": SID_K, "plausibility": "gradcam_dilated",
                             "qpm_gradcam_weight": "binary W (reference definition)",
                             "masks": run.test.masks is not None}
    write_json(run_dir / "metrics.json", metrics)
    qpm = models["qpm"]
    assert isinstance(qpm, DinoQPM)
    views = render_explanations(qpm, run, run_dir / "explanations", console=console)
    write_report(run_dir, metrics, views)
    return metrics


def _test_images(run: Run, console: Console) -> Any:
    """sample index -> PIL image of the test split, or a grey placeholder when the dataset cannot be read."""
    try:
        ds = load_dataset(run.cfg.data, "test")
        if list(ds.ids) != list(run.test.meta["ids"]):
            raise ValueError("its samples differ from the cached test split")
        return lambda i: ds[int(i)][0]
    except (OSError, ValueError) as e:
        console.warn(f"explanations drawn without the images (test split unreadable: {e})")
        size = run.cfg.data.image_size
        return lambda i: Image.new("RGB", (size, size), (128, 128, 128))


def render_explanations(model: DinoQPM, run: Run, out: Path, *, console: Console) -> dict[str, Any]:
    """Global, contrast and local views of the QPM model on the cached test split, as PNG + JSON in `out`."""
    assert isinstance(model.head, SparseHead)
    out.mkdir(parents=True, exist_ok=True)
    store, classes = run.test, run.test.classes
    image_of = _test_images(run, console)
    w = model.head.weight
    glob = global_explanation(w.cpu(), classes, selection=model.head.selection.tolist())
    render_global(glob, out / "global.png")
    write_json(out / "global.json", glob.to_dict())

    logits, z, _ = model_outputs(model, store)
    pred, y = logits.argmax(1), store.labels
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    # Raw pooled activations pick the examples: f = z σ + μ is monotone in z, so the same image wins.
    feats = z * model.head.std.clamp_min(1e-6).cpu().numpy() + model.head.mean.cpu().numpy()
    ids = store.meta["ids"]
    contrast = contrast_explanation(w, classes, confusion=confusion, features=feats, labels=y, ids=ids,
                                    maps_of=lambda idx: model_outputs(model, store, keep=np.asarray(idx),
                                                                      rows=np.asarray(idx))[2])
    render_contrast(contrast, image_of, out / "contrast.png")
    write_json(out / "contrast.json", contrast.to_dict())

    locals_ = []
    for i in pick_local_samples(logits, y, (contrast.class_a, contrast.class_b)):
        tokens = join_tokens(torch.from_numpy(np.asarray(store.patch[[i]], dtype=np.float32)),
                             torch.from_numpy(np.asarray(store.cls[[i]], dtype=np.float32)))
        expl = explain_tokens(model, tokens, classes=classes, images=[ids[i]], labels=[int(y[i])])[0]
        name = f"local_{len(locals_)}"
        render_local(expl, image_of(i), out / f"{name}.png")
        write_json(out / f"{name}.json", expl.to_dict())
        locals_.append({"png": f"{name}.png", "sample": int(i), "explanation": expl})
    return {"global": glob, "contrast": contrast, "locals": locals_}


def pick_local_samples(logits: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> list[int]:
    """Deterministic images to explain: the most confident correct one of each given class, then the most
    confident mistake (if any), at most N_LOCAL."""
    pred = logits.argmax(1)
    margin = np.sort(logits, axis=1)[:, -1] - (np.sort(logits, axis=1)[:, -2] if logits.shape[1] > 1 else 0)
    picks: list[int] = []
    for c in classes:
        good = np.flatnonzero((labels == c) & (pred == c))
        if good.size:
            picks.append(int(good[np.argmax(margin[good])]))
    wrong = np.flatnonzero(pred != labels)
    if wrong.size:
        picks.append(int(wrong[np.argmax(margin[wrong])]))
    if not picks and len(labels):
        picks.append(0)
    return picks[:N_LOCAL]


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v:.4f}"


def write_report(run_dir: Path, metrics: dict[str, Any], views: dict[str, Any]) -> Path:
    """A short report.md: metrics table, QP certificate and the embedded explanation PNGs."""
    ev = metrics["evaluation"]
    glob, contrast = views["global"], views["contrast"]
    lines = [f"# DINO-QPM run report: {run_dir.name}", "",
             f"Test split: {ev['test_images']} images (accuracy); SID@{ev['sid_k']} and plausibility on "
             + ("all of them; " if ev["map_images"] == ev["test_images"] else
                f"{ev['map_images']} of them (seeded draw, seed {ev['map_images_seed']}); ")
             + "class independence, "
             f"contrastiveness and correlation on the {ev['train_images']} train images. Values in %.", "",
             "| model | " + " | ".join(label for _, label in REPORTED) + " |",
             "|---" * (len(REPORTED) + 1) + "|"]
    for name in MODELS:
        sec = metrics.get(name, {})
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(_fmt(sec.get(k), pct=True) for k, _ in REPORTED)
                     + " |")
    qp = metrics.get("qp", {})
    formats = {"objective": "{:.6g}", "bound": "{:.6g}", "gap": "{:.3%}", "seconds": "{:.2f}"}
    cert = ", ".join(f"{k} " + (formats[k].format(qp[k]) if k in formats and isinstance(qp[k], (int, float))
                                else str(qp[k])) for k in ("status", "objective", "bound", "gap", "solver",
                                                           "solver_version", "seconds") if k in qp)
    lines += ["", f"QP certificate: {cert or 'not recorded'}.", "",
              "Linear probe maps are its raw patch tokens (it classifies the CLS token), so its SID and plausibility "
              "are a baseline only. Plausibility is the dilated GradCAM-mass overlap (binary W for QPM); "
              + ("the other overlap variants are in metrics.json." if ev["masks"] else
                 "this dataset has no object masks."), "",
              f"## Global view: {len(glob.classes)} classes x {len(glob.selection)} features, {glob.n_per_class} "
              "per class", "", "![global view](explanations/global.png)", ""]
    if views["locals"]:
        first = views["locals"][0]
        e = first["explanation"]
        parts = " ".join(f"{f.contribution:+.2f} (f{f.feature})" for f in e.features)
        lines += [f"## Local view: test image {e.image} (true {e.label_name}), predicted {e.predicted_name}", "",
                  f"Logit {e.logit:+.3f} = {parts}.", "", f"![local view](explanations/{first['png']})", ""]
        if len(views["locals"]) > 1:
            lines += ["More: " + ", ".join(f"[{x['png']}](explanations/{x['png']})" for x in views["locals"][1:]),
                      ""]
    lines += [f"## Contrast view: {contrast.name_a} vs {contrast.name_b}", "",
              f"Chosen as {contrast.reason}. Shared: {', '.join(f'f{j}' for j in contrast.shared) or 'none'}; only "
              f"{contrast.name_a}: {', '.join(f'f{j}' for j in contrast.only_a) or 'none'}; only {contrast.name_b}: "
              f"{', '.join(f'f{j}' for j in contrast.only_b) or 'none'}. Each cell shows the test image of its row's "
              "class where the feature is strongest.", "", "![contrast view](explanations/contrast.png)", ""]
    path = run_dir / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.evaluate",
                                     description="Metrics, explanations and report.md of a finished run.")
    parser.add_argument("--run", required=True, type=Path, help="run directory written by the pipeline")
    parser.add_argument("--max-map-images", type=int, default=1000,
                        help="most test images for SID@5 and plausibility (seeded draw above it)")
    args = parser.parse_args(argv)
    try:
        metrics = evaluate_run(args.run, max_map_images=args.max_map_images)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.run / 'metrics.json'}, {args.run / 'report.md'} and {args.run / 'explanations'}/")
    for name in MODELS:
        print(f"  {name}: " + ", ".join(f"{label}={_fmt(metrics[name].get(k))}" for k, label in REPORTED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
