"""The run report: global, contrast and local views of the QPM model on the cached test split, and report.md."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from toolkit.console import Console
from toolkit.data import load_dataset
from toolkit.explain.render import render_contrast, render_global, render_local
from toolkit.explain.views import contrast_explanation, explain_tokens, global_explanation
from toolkit.files import atomic_write_text, write_json
from toolkit.metrics import MODELS, REPORTED
from toolkit.model import DinoQPM, SparseHead, join_tokens
from toolkit.runs import Run
from toolkit.train import evaluate, store_maps

N_LOCAL = 3  # local views in the report


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

    dev = next(model.parameters()).device
    out_test = evaluate(model, store.dataset(), batch_size=256, device=dev, head_inputs=True)
    logits, z = out_test.logits, out_test.features
    pred, y = logits.argmax(1), store.labels
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    # Raw pooled activations pick the examples: f = z σ + μ is monotone in z, so the same image wins.
    feats = z * model.head.std.clamp_min(1e-6).cpu().numpy() + model.head.mean.cpu().numpy()
    ids = store.meta["ids"]
    contrast = contrast_explanation(w, classes, confusion=confusion, features=feats, labels=y, ids=ids,
                                    maps_of=lambda idx: store_maps(model, store, np.asarray(idx)))
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


def format_metric(v: Any, pct: bool = False) -> str:
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
        cells = " | ".join(format_metric(sec.get(k), pct=True) for k, _ in REPORTED)
        lines.append(f"| {name.replace('_', ' ')} | {cells} |")
    p2 = metrics.get("linear_probe_dinov2")
    if p2:  # accuracy only: a probe on concatenated tokens has no feature maps of its own
        cells = " | ".join(format_metric(p2.get(k) if k == "accuracy" else None, pct=True) for k, _ in REPORTED)
        lines += [f"| linear probe (DINOv2 protocol) | {cells} |", "",
                  f"DINOv2-protocol probe: CLS of the last {p2.get('n_blocks')} block(s)"
                  + (" + average patch token" if p2.get("avgpool") else "") + f", lr {p2.get('lr')}, chosen on a "
                  "held-out share of the train split (docs/method.md#baselines)."]
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
    atomic_write_text(path, "\n".join(lines))
    return path
