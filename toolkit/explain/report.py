"""The run report: global, contrast and local views of the QPM model on the cached test split, and report.md."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from toolkit.console import Console
from toolkit.data import EVAL_SPLITS, load_dataset
from toolkit.explain.atlas import build_atlas, render_atlas, thumbnails
from toolkit.explain.render import render_contrast, render_global, render_local
from toolkit.explain.views import contrast_explanation, explain_tokens, global_explanation
from toolkit.files import atomic_write_text, write_json
from toolkit.metrics import MODELS, REPORTED
from toolkit.model import DinoQPM, SparseHead, join_tokens
from toolkit.runs import Run
from toolkit.train import evaluate, store_maps

N_LOCAL = 3  # local views in report.md
N_GALLERY = 3  # correctly and wrongly classified test images each in report.html
N_CLASS_EXAMPLES = 4  # test images on a class card
MAX_CLASS_CONTRASTS = 30  # class cards with a contrast figure (the most confused pairs); the rest say why not

# What every reported metric measures and which direction is better (docs/method.md#metrics): report.md,
# report.html and the evaluate CLI print these, so no number appears without its meaning.
METRIC_INFO: dict[str, tuple[str, str]] = {
    "accuracy": ("higher", "share of the split's images (validation or test) whose top-1 class is right"),
    "sid_at_5": ("higher", "spatial diversity of the predicted class's 5 feature maps on the image (1/5 .. 1)"),
    "class_independence": ("higher", "how little any single class owns a feature's activation mass (train split)"),
    "contrastiveness": ("higher", "how cleanly each feature separates 'off' from 'on' (1 − overlap of a 2-Gaussian "
                        "fit; train split)"),
    "correlation": ("lower", "redundancy: each feature's largest cosine similarity to another feature (train split)"),
    "plausibility": ("higher", "share of the predicted class's GradCAM mass on the object (dilated mask)"),
    "structural_grounding": ("higher", "how well class similarities in the head match class-attribute similarities "
                                       "(CUB attributes)"),
}


def metric_label(key: str, label: str) -> str:
    """A column label that says which direction is better, e.g. "SID@5 (higher = better)"."""
    base = label.split(" (")[0]
    better = METRIC_INFO.get(key, ("", ""))[0]
    return f"{base} ({better} = better)" if better else base


def _split_images(run: Run, split: str, console: Console) -> Any:
    """sample index -> PIL image of a cached split, or a grey placeholder when the dataset cannot be read."""
    store = run.test if split == "test" else run.train
    try:
        ds = load_dataset(run.cfg.data, split)
        if list(ds.ids) != list(store.meta["ids"]):
            raise ValueError(f"its samples differ from the cached {split} split")
        return lambda i: ds[int(i)][0]
    except (OSError, ValueError) as e:
        console.warn(f"explanations drawn without the images ({split} split unreadable: {e})")
        size = run.cfg.data.image_size
        return lambda i: Image.new("RGB", (size, size), (128, 128, 128))


def _test_images(run: Run, console: Console) -> Any:
    return _split_images(run, "test", console)


def _histories(run: Run) -> dict[str, list[dict[str, float]]]:
    """Per training stage (probe, dense, finetune) its per-epoch history, from the stage directories."""
    out = {}
    for stage in ("probe", "dense", "finetune"):
        try:
            path = run.stage_dir(stage) / "history.json"
        except FileNotFoundError:
            continue
        if path.is_file():
            out[stage] = json.loads(path.read_text())
    return out


def most_confused(confusion: np.ndarray, weight: np.ndarray, c: int) -> tuple[int, int]:
    """The class that c is most often mixed up with (either direction), ties broken by shared features, then index.

    Returns:
        (other class, test images confused between them).
    """
    both = confusion[c] + confusion[:, c]
    shared = (weight.astype(bool) & weight[c].astype(bool)).sum(axis=1)
    others = [o for o in range(len(both)) if o != c]
    o = max(others, key=lambda o: (int(both[o]), int(shared[o]), -o))
    return o, int(both[o])


def pick_gallery(logits: np.ndarray, labels: np.ndarray, n: int = N_GALLERY) -> tuple[list[int], list[int]]:
    """Test images for the page's local views: the n most confident correct ones (one per class first) and the n
    most confident mistakes."""
    pred = logits.argmax(1)
    srt = np.sort(logits, axis=1)
    margin = srt[:, -1] - (srt[:, -2] if logits.shape[1] > 1 else 0)
    good = np.flatnonzero(pred == labels)
    good = good[np.argsort(-margin[good], kind="stable")]
    correct: list[int] = []
    for i in good:  # distinct classes first, then the rest
        if labels[i] not in {labels[j] for j in correct} and len(correct) < n:
            correct.append(int(i))
    correct += [int(i) for i in good if int(i) not in correct][:n - len(correct)]
    wrong = np.flatnonzero(pred != labels)
    wrong = wrong[np.argsort(-margin[wrong], kind="stable")]
    return correct, [int(i) for i in wrong[:n]]


def render_explanations(model: DinoQPM, run: Run, out: Path, *, console: Console) -> dict[str, Any]:
    """Every view of the QPM model as PNG + JSON in `out`, and `out/index.json`, which `html.write_html` reads.

    Global view, default contrast, local views (report.md's three, plus the most confident correct and wrong test
    images), the feature atlas on the train split, and one card per class with its example test images and a
    contrast with the class it is most confused with.
    """
    assert isinstance(model.head, SparseHead)
    out.mkdir(parents=True, exist_ok=True)
    store, classes = run.test, run.test.classes
    image_of = _test_images(run, console)
    w = model.head.weight
    w_np = w.detach().cpu().numpy()
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
    maps_of = lambda idx: store_maps(model, store, np.asarray(idx))  # noqa: E731
    contrast = contrast_explanation(w, classes, confusion=confusion, features=feats, labels=y, ids=ids,
                                    maps_of=maps_of)
    render_contrast(contrast, image_of, out / "contrast.png")
    write_json(out / "contrast.json", contrast.to_dict())

    locals_: list[dict[str, Any]] = []
    correct, wrong = pick_gallery(logits, y)
    picks = pick_local_samples(logits, y, (contrast.class_a, contrast.class_b))
    for i in [*picks, *[s for s in [*correct, *wrong] if s not in picks]]:
        tokens = join_tokens(torch.from_numpy(np.asarray(store.patch[[i]], dtype=np.float32)),
                             torch.from_numpy(np.asarray(store.cls[[i]], dtype=np.float32)))
        expl = explain_tokens(model, tokens, classes=classes, images=[ids[i]], labels=[int(y[i])])[0]
        name = f"local_{len(locals_)}"
        render_local(expl, image_of(i), out / f"{name}.png")
        write_json(out / f"{name}.json", expl.to_dict())
        locals_.append({"png": f"{name}.png", "sample": int(i), "explanation": expl,
                        "correct": bool(pred[i] == y[i]), "in_report_md": i in picks})

    atlas, atlas_maps = build_atlas(model, run.train, split="train")
    render_atlas(atlas, atlas_maps, _split_images(run, "train", console), out)
    write_json(out / "atlas.json", atlas.to_dict())

    cards = []
    rendered: dict[tuple[int, int], str] = {}
    # A contrast figure costs about a second: with many classes (CUB: 200) only the most confused pairs get one.
    partners = {c: most_confused(confusion, w_np, c) for c in range(len(classes))} if len(classes) > 1 else {}
    pairs = {(min(c, o), max(c, o)): n for c, (o, n) in partners.items()}
    drawn = set(sorted(pairs, key=lambda ab: (-pairs[ab], ab))[:MAX_CLASS_CONTRASTS])
    margin = np.sort(logits, axis=1)[:, -1] - (np.sort(logits, axis=1)[:, -2] if logits.shape[1] > 1 else 0)
    for c, name in enumerate(classes):
        own = np.flatnonzero((y == c) & (pred == c))
        own = own[np.argsort(-margin[own], kind="stable")][:N_CLASS_EXAMPLES]
        examples_png = None
        if own.size:
            examples_png = f"classes/class_{c}.png"
            thumbnails([image_of(i) for i in own], out / examples_png)
        card: dict[str, Any] = {"class": c, "name": name, "features": np.flatnonzero(w_np[c]).tolist(),
                                "test_images": int((y == c).sum()), "correct": int(confusion[c, c]),
                                "examples": [str(ids[i]) for i in own], "examples_png": examples_png,
                                "confused_with": None}
        if partners:
            o, n_confused = partners[c]
            a, b = min(c, o), max(c, o)
            if (a, b) in drawn and (a, b) not in rendered:
                pair = contrast_explanation(w, classes, a=a, b=b, features=feats, labels=y, ids=ids, maps_of=maps_of)
                pair = dataclasses.replace(pair, reason=f"most confused with each other ({n_confused} test images)")
                rendered[(a, b)] = f"classes/contrast_{a}_{b}.png"
                render_contrast(pair, image_of, out / rendered[(a, b)])
            card["confused_with"] = {"class": o, "name": classes[o], "test_images": n_confused,
                                     "as_other": int(confusion[c, o]), "as_this": int(confusion[o, c]),
                                     "shared": int((w_np[c].astype(bool) & w_np[o].astype(bool)).sum()),
                                     "contrast_png": rendered.get((a, b))}
        cards.append(card)

    index = {"classes": list(classes), "global": glob.to_dict(), "global_png": "global.png",
             "contrast": {**contrast.to_dict(), "png": "contrast.png", "examples": None},
             "confusion": confusion.tolist(), "class_cards": cards, "atlas": "atlas.json",
             "locals": [{"png": x["png"], "json": x["png"].replace(".png", ".json"), "sample": x["sample"],
                         "correct": x["correct"], **x["explanation"].to_dict(maps=False)} for x in locals_],
             "histories": _histories(run)}
    write_json(out / "index.json", index)
    return {"global": glob, "contrast": contrast, "locals": [x for x in locals_ if x["in_report_md"]],
            "atlas": atlas, "index": index}


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


SPLIT_LABELS = {"val": "validation", "test": "test"}


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None]]:
    """The rows of the metrics table: (model label, split label, that split's metrics or None), every model on
    validation then test, side by side. The DINOv2-protocol probe has accuracy only (no feature maps of its own)."""
    rows = []
    models = [(m, m.replace("_", " ").replace("dino qpm", "DINO-QPM")) for m in MODELS]
    if metrics.get("linear_probe_dinov2"):
        models.insert(1, ("linear_probe_dinov2", "linear probe (DINOv2 protocol)"))
    held = (metrics.get("validation") or {}).get("held_out", True)
    for key, label in models:
        sec = metrics.get(key) or {}
        for split in EVAL_SPLITS:
            if split == "val" and not held:
                continue
            part = sec.get(split)
            if key == "linear_probe_dinov2" and part:
                part = {"accuracy": part.get("accuracy")}
            rows.append((label, SPLIT_LABELS[split], part))
    return rows


def validation_note(metrics: dict[str, Any]) -> str:
    """One sentence on the validation split: its size and draw, or that nothing was held out."""
    v = metrics.get("validation") or {}
    if not v.get("held_out"):
        return ("No validation split (data.val_fraction=0): every model trained on the whole train split; only test "
                "metrics exist.")
    return (f"Validation: {v['n_val']} train images held out (data.val_fraction={v['fraction']:g}, seed {v['seed']}, "
            f"class-stratified); every model trained on the other {v['n_fit']}. Decisions read validation; test is "
            "only reported.")


def undefined_notes(metrics: dict[str, Any]) -> list[str]:
    """One line per metric the data could not define: "<model> (<split>): <metric> n/a: <reason>"."""
    labels = dict(REPORTED)
    return [f"{model} ({split}): {labels.get(k, k)} n/a: {why}" for model, split, sec in metric_rows(metrics)
            for k, why in ((sec or {}).get("undefined") or {}).items()]


def format_metric(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v:.4f}"


def write_report(run_dir: Path, metrics: dict[str, Any], views: dict[str, Any]) -> Path:
    """A short report.md: metrics table, QP certificate and the embedded explanation PNGs."""
    ev = metrics["evaluation"]
    glob, contrast = views["global"], views["contrast"]
    maps = ("all of them" if ev["map_images"] == ev["test_images"] else
            f"{ev['map_images']} of them (seeded draw, seed {ev['map_images_seed']})")
    lines = [f"# DINO-QPM run report: {run_dir.name}", "", validation_note(metrics), "",
             f"Test split: {ev['test_images']} images (accuracy); SID@{ev['sid_k']} and plausibility on {maps}"
             + (f"; validation: {ev.get('val_images')} images, maps on {ev.get('val_map_images')}"
                if ev.get("val_images") else "") + "; class independence, "
             f"contrastiveness and correlation on the {ev['train_images']} train images trained on. Values in %.", "",
             "| model | split | " + " | ".join(metric_label(k, label) for k, label in REPORTED) + " |",
             "|---" * (len(REPORTED) + 2) + "|"]
    for model, split, sec in metric_rows(metrics):
        cells = " | ".join(format_metric((sec or {}).get(k), pct=True) for k, _ in REPORTED)
        lines.append(f"| {model} | {split} | {cells} |")
    notes = undefined_notes(metrics)
    if notes:
        lines += ["", "Not computable on this data (n/a above):", "", *(f"- {n}" for n in notes)]
    p2 = metrics.get("linear_probe_dinov2")
    if p2:
        lines += ["", f"DINOv2-protocol probe: CLS of the last {p2.get('n_blocks')} block(s)"
                  + (" + average patch token" if p2.get("avgpool") else "") + f", lr {p2.get('lr')}, chosen on "
                  f"{p2.get('chosen_on', 'the validation split')}; its validation accuracy is the best of the heads "
                  "it chose among, so it reads high (docs/method.md#baselines)."]
    qp = metrics.get("qp_certificate", {})
    formats = {"objective": "{:.6g}", "bound": "{:.6g}", "gap": "{:.3%}", "seconds": "{:.2f}"}
    cert = ", ".join(f"{k} " + (formats[k].format(qp[k]) if k in formats and isinstance(qp[k], (int, float))
                                else str(qp[k])) for k in ("status", "objective", "bound", "gap", "solver",
                                                           "solver_version", "seconds") if k in qp)
    lines += ["", f"QP certificate: {cert or 'not recorded'}.", "",
              "Linear probe maps are its raw patch tokens (it classifies the CLS token), so its SID and plausibility "
              "are a baseline only. Plausibility is the dilated GradCAM-mass overlap (binary W for QPM); "
              + ("the other overlap variants are in metrics.json." if ev["masks"] else
                 "this dataset has no object masks."), "",
              "Metrics: " + "; ".join(f"{label.split(' (')[0]}: {METRIC_INFO[k][1]} ({METRIC_INFO[k][0]} = better)"
                                      for k, label in REPORTED if k in METRIC_INFO) + ".", "",
              f"## Global view: {len(glob.classes)} classes x {glob.n_used} features used, {glob.n_per_class} "
              "per class", "", "![global view](explanations/global.png)", "",
              "The browsable report, with a card per feature (its strongest training images) and per class: "
              "[report.html](report.html).", ""]
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
