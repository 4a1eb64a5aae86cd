"""Torch-free inference with an exported DINO-QPM graph: predictions, feature contributions and map overlays.

    python export/predict.py --model model.onnx --images PATH... --out DIR [--provider cuda|cpu] [--top-k 5]

Needs only onnxruntime (or onnxruntime-gpu), numpy and pillow: this file imports nothing else outside the standard
library, so it can be copied next to the .onnx file and deployed alone. Everything it needs (class names, input size,
the class -> feature assignment, the head's mean/std) is read from the model's `dinoqpm.*` metadata.

Writes `DIR/predictions.json`, `DIR/predictions.html` (a self-contained page: open it from disk, no server or network)
and one `DIR/<image stem>.png` per image: the input, the m feature maps of the predicted class over it (bilinear
upsampling, min-max normalised, jet colours, opacity proportional to the activation, as the toolkit's explanation
module draws them) and all m maps combined. An image that cannot be read does not stop the batch: it is listed under
`failed` with its reason (JSON and page), the others are predicted.

Contributions: the graph's head is folded, logits = W' f + b with W'_cj = W_cj / std_j and b_c = -sum_j W'_cj mean_j
(W binary). The bias is split over the class's features by the term each feature's standardisation put there:
contribution_j = W'_cj f_j + b_cj with b_cj = -W'_cj mean_j, i.e. W_cj (f_j - mean_j) / std_j as in the unfolded
model, so the m contributions add up to the logit (up to float rounding, reported as `residual`). Per feature the JSON
gives `weight` = W_cj (the binary class-feature weight, as `python -m toolkit.explain` writes it), `folded_weight` =
W'_cj and `bias_share` = b_cj.

Precision: fp32, fp16 and int8 graphs run alike (float32 in and out). For an int8 graph, `predictions.json` also
carries `fidelity`: the numbers its export gate measured against the fp32 graph on held-out images (top-1 agreement,
feature-map correlation, contribution rank agreement, accuracy), so a reader knows how far the maps can be trusted.

CUDA: `--provider cuda` fails, with the reason, when ONNX Runtime cannot run the graph on the CUDA execution provider;
it never falls back to the CPU silently. Exit status: 0 done, 1 some images could not be read (the rest were
predicted), 2 usage or provider error.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PREDICTIONS = "predictions.json"
PAGE = "predictions.html"
PREFIX = "dinoqpm."
DISPLAY_PX = 224  # panel height, as in toolkit.explain.render
MAX_ALPHA = 0.75  # opacity of a map at its maximum
COMBINED_THRESHOLD = 0.2  # the combined overlay leaves pixels whose strongest feature is below this uncoloured
TITLE_PX, HEADER_PX = 34, 24
# matplotlib's "jet" and "tab10", as (position, value) knots and RGB triples, so no matplotlib is needed.
_JET = {"r": ([0, 0.35, 0.66, 0.89, 1], [0, 0, 1, 1, 0.5]), "g": ([0, 0.125, 0.375, 0.64, 0.91, 1], [0, 0, 1, 1, 0, 0]),
        "b": ([0, 0.11, 0.34, 0.65, 1], [0.5, 1, 1, 0, 0])}
_TAB10 = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
                   [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]], dtype=np.float32)


class PredictError(Exception):
    """A usage or provider error: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------- session, metadata


def open_session(model: Path, provider: str, *, threads: int | None = None,
                 spin: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime session on `provider` ("cpu" or "cuda"); CUDA that does not really load is an error.

    `threads` sets the intra-op pool (and one inter-op thread): ONNX Runtime ignores OMP_NUM_THREADS and otherwise
    takes every physical core, which several processes sharing a machine (a service's replicas) must not do.
    `spin=False` stops the pool's threads from spin-waiting for work between and inside calls: a service's replica
    shares its cores with its own request handling, which spinning threads would take CPU from.
    """
    if not model.is_file():
        raise PredictError(f"model file {model} does not exist")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads, opts.inter_op_num_threads = max(1, int(threads)), 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if provider == "cpu":
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise PredictError(f"--provider cuda: this onnxruntime {ort.__version__} build has no CUDA execution provider "
                           f"(available: {', '.join(available)}). Install the gpu extra in a fresh environment "
                           "(onnxruntime-gpu; it cannot share one with the CPU onnxruntime package)")
    if hasattr(ort, "preload_dlls"):  # ORT >= 1.21: load CUDA/cuDNN from pip wheels (nvidia-*, torch) if present
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - best effort; the provider check below is what decides
            pass
    session = ort.InferenceSession(str(model), opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise PredictError(f"--provider cuda: onnxruntime {ort.__version__} lists the CUDA execution provider but the "
                           f"session got {session.get_providers()} (its error is logged above). Usual cause: the CUDA "
                           "12 / cuDNN 9 libraries it was built against are missing or mismatched; install them (e.g. "
                           "pip install nvidia-cudnn-cu12 nvidia-cublas-cu12) or use --provider cpu")
    return session


def read_metadata(session: ort.InferenceSession) -> dict[str, Any]:
    """The `dinoqpm.*` metadata, JSON-decoded, without the prefix."""
    raw = session.get_modelmeta().custom_metadata_map
    meta = {k.removeprefix(PREFIX): json.loads(v) for k, v in raw.items() if k.startswith(PREFIX)}
    missing = [k for k in ("classes", "assignment", "image_size", "head", "feature_ids") if k not in meta]
    if missing:
        raise PredictError(f"the model lacks the dinoqpm metadata {missing}; export it with export/to_onnx.py")
    return meta


# ----------------------------------------------------------------------------------------------------------- images


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (recursively, sorted); missing paths are errors."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PredictError(f"folder {p} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise PredictError(f"image file {p} does not exist")
    return out


def open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise PredictError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e


def to_input(picture: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """PIL image -> (3, H, W) float32 in [0, 1]: the bicubic square resize the toolkit trains with, then /255."""
    h, w = size
    arr = np.asarray(picture.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    return arr.transpose(2, 0, 1)


# ------------------------------------------------------------------------------------------------------- prediction


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def explain_one(logits: np.ndarray, features: np.ndarray, meta: dict[str, Any], top_k: int) -> dict[str, Any]:
    """Prediction, top-k and the predicted class's feature contributions for one image (module docstring).

    Args:
        logits: (C,) graph output.
        features: (k,) graph output.
        meta: the model's metadata.
        top_k: how many classes to list.
    """
    classes, head = meta["classes"], meta["head"]
    mean, std = np.asarray(head["mean"], np.float64), np.asarray(head["std"], np.float64)
    probs = softmax(logits.astype(np.float64))
    order = np.argsort(-logits, kind="stable")
    c = int(order[0])
    feats = []
    for j in meta["assignment"][c]:
        folded = 1.0 / std[j]  # W'_cj for the binary W_cj = 1
        bias_share = -folded * mean[j]
        feats.append({"feature": int(j), "channel": int(meta["feature_ids"][j]), "activation": float(features[j]),
                      "mean": float(mean[j]), "std": float(std[j]), "weight": 1.0, "folded_weight": float(folded),
                      "bias_share": float(bias_share), "contribution": float(folded * features[j] + bias_share)})
    feats.sort(key=lambda f: -f["contribution"])
    total = float(sum(f["contribution"] for f in feats))
    return {"predicted": c, "predicted_name": classes[c], "logit": float(logits[c]), "probability": float(probs[c]),
            "top_k": [{"class": int(i), "name": classes[int(i)], "logit": float(logits[i]),
                       "probability": float(probs[i])} for i in order[:top_k]],
            "features": feats, "contribution_sum": total, "residual": float(logits[c]) - total}


# --------------------------------------------------------------------------------------------------------- overlays


def jet(norm: np.ndarray) -> np.ndarray:
    """(..., ) values in [0, 1] -> (..., 3) jet colours in [0, 1]."""
    return np.stack([np.interp(norm, *_JET[ch]) for ch in "rgb"], axis=-1)


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of one (h, w) map to size (H, W), float32."""
    img = Image.fromarray(np.asarray(grid_map, dtype=np.float32))  # float32 -> mode "F"
    return np.asarray(img.resize((size[1], size[0]), Image.BILINEAR))


def normalise(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)


def blend(base: np.ndarray, rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """base (H, W, 3) uint8, rgb (H, W, 3) in [0, 1], alpha (H, W) -> uint8."""
    out = base.astype(np.float32) * (1 - alpha[..., None]) + 255.0 * rgb * alpha[..., None]
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def panels(picture: Image.Image, maps: np.ndarray, pred: dict[str, Any]) -> list[tuple[str, str, np.ndarray]]:
    """The panels of one image: input, one overlay per feature of the predicted class, all combined.

    Args:
        picture: the input image.
        maps: (k, h, w) graph output for this image.
        pred: `explain_one`'s result (its features give the panel order).

    Returns:
        (title, subtitle, (DISPLAY_PX, W, 3) uint8 image) per panel.
    """
    h, w = maps.shape[1:]
    size = (DISPLAY_PX, max(1, round(DISPLAY_PX * w / h)))  # the model's aspect ratio
    base = np.asarray(picture.resize((size[1], size[0]), Image.BICUBIC))
    ups = [upsample(maps[f["feature"]], size) for f in pred["features"]]
    norms = [normalise(u) for u in ups]
    out = [("input", "", base)]
    for f, n in zip(pred["features"], norms):
        out.append((f"f{f['feature']} (ch {f['channel']})", f"{f['contribution']:+.2f}",
                       blend(base, jet(n), MAX_ALPHA * n)))
    if norms:
        stack = np.stack(norms)
        top, strength = stack.argmax(axis=0), stack.max(axis=0)
        colours = _TAB10[np.arange(len(norms)) % len(_TAB10)] / 255.0
        alpha = np.where(strength >= COMBINED_THRESHOLD, 0.8 * strength, 0.0)
        out.append(("combined", "(colours: title)", blend(base, colours[top], alpha)))
    return out


def compose(picture: Image.Image, maps: np.ndarray, pred: dict[str, Any], name: str) -> Image.Image:
    """`panels` side by side under a header naming the prediction (`name` is shown in it)."""
    panels_ = panels(picture, maps, pred)
    n_maps = len(panels_) - 2 if len(panels_) > 1 else 0
    size = panels_[0][2].shape[:2]
    pad = 6
    width = len(panels_) * (size[1] + pad) + pad
    canvas = Image.new("RGB", (width, HEADER_PX + TITLE_PX + size[0] + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((pad, 6), f"{name}: {pred['predicted_name']} (p = {pred['probability']:.2f}), logit "
                        f"{pred['logit']:+.2f} = sum of {len(pred['features'])} contributions", fill="black", font=font)
    for i, (title, sub, arr) in enumerate(panels_):
        x = pad + i * (size[1] + pad)
        colour = tuple(int(v) for v in _TAB10[(i - 1) % len(_TAB10)]) if 0 < i <= n_maps else (0, 0, 0)
        draw.text((x, HEADER_PX), title, fill=colour, font=font)
        draw.text((x, HEADER_PX + 14), sub, fill=colour, font=font)
        canvas.paste(Image.fromarray(arr), (x, HEADER_PX + TITLE_PX))
    return canvas


def render(picture: Image.Image, maps: np.ndarray, pred: dict[str, Any], name: str, path: Path) -> tuple[int, int]:
    """`compose` saved as one PNG at `path`. Returns its (width, height)."""
    canvas = compose(picture, maps, pred, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return canvas.size


# ----------------------------------------------------------------------------------------------------------- driver


def output_names(images: Sequence[Path]) -> list[str]:
    """`<stem>.png` per image; repeated stems get `_2`, `_3`, ... in input order."""
    seen: dict[str, int] = {}
    names = []
    for p in images:
        seen[p.stem] = seen.get(p.stem, 0) + 1
        names.append(f"{p.stem}.png" if seen[p.stem] == 1 else f"{p.stem}_{seen[p.stem]}.png")
    return names


def read_batch(paths: Sequence[Path], names: Sequence[str], failed: list[dict[str, str]]
               ) -> tuple[list[Path], list[Image.Image], list[str]]:
    """The readable images of a batch with their output names; each unreadable one is appended to `failed` as
    {"image", "error"} and left out, so one bad file does not stop the others."""
    ok: list[Path] = []
    pictures: list[Image.Image] = []
    ok_names: list[str] = []
    for path, name in zip(paths, names):
        try:
            pictures.append(open_image(path))
        except PredictError as e:
            failed.append({"image": str(path), "error": str(e)})
            continue
        ok.append(path)
        ok_names.append(name)
    return ok, pictures, ok_names


# ------------------------------------------------------------------------------------------------------------- page

PAGE_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:0 auto;padding:0 16px 24px;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px;font-size:13px}"
             "th{background:#f4f4f4}.card{border:1px solid #ccc;border-radius:6px;padding:8px 12px;margin:10px 0}"
             ".num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}.muted{color:#666}"
             ".failed{color:#c0392b}")
CONTRIBUTION_NOTE = ("Contribution of feature j to the logit of the predicted class c: W_cj (f_j − μ_j)/σ_j "
                     "(W binary); the contributions add up to the logit.")


def card(i: int, p: dict[str, Any]) -> str:
    """One image's card of the page: its overlay PNG (`p["png"]`, a file name or a data URL), top-k classes and the
    predicted class's feature contributions. `p` is a record of `predictions.json`."""
    esc = html.escape
    top = "".join(f'<tr><td>{esc(t["name"])}</td><td class="num">{t["probability"]:.3f}</td>'
                  f'<td class="num">{t["logit"]:+.3f}</td></tr>' for t in p["top_k"])
    feats = "".join(f'<tr><td>f{f["feature"]}</td><td class="num">{f["channel"]}</td>'
                    f'<td class="num">{f["activation"]:.3f}</td><td class="num">{f["mean"]:.3f}</td>'
                    f'<td class="num">{f["std"]:.3f}</td><td class="num">{f["contribution"]:+.3f}</td></tr>'
                    for f in p["features"])
    return (f'<div class="card" id="img-{i}"><h2>{esc(Path(p["image"]).name)}: {esc(p["predicted_name"])} '
            f'(p = {p["probability"]:.3f})</h2><p class="muted">{esc(p["image"])}; logit {p["logit"]:+.3f} = '
            f'sum of {len(p["features"])} contributions (residual {p["residual"]:.1e}).</p>'
            f'<img src="{esc(p["png"], quote=True)}" alt="{esc(p["image"], quote=True)}">'
            '<div style="display:flex;gap:16px;align-items:flex-start;margin-top:6px">'
            '<table><tr><th>class</th><th>probability</th>'
            f'<th>logit</th></tr>{top}</table><table><tr><th>feature</th>'
            "<th>channel</th><th>activation f</th><th>μ</th><th>σ</th><th>contribution</th></tr>"
            f"{feats}</table></div></div>")


def write_page(result: dict[str, Any], path: Path) -> Path:
    """`predictions.html`: one `card` per image and the images that could not be read, with their reasons.
    Self-contained: the PNGs are files beside it, no script, no network."""
    esc = html.escape
    preds, failed = result["predictions"], result.get("failed", [])
    nav = "".join(f'<li><a href="#img-{i}">{esc(Path(p["image"]).name)}</a>: {esc(p["predicted_name"])} '
                  f'(p = {p["probability"]:.3f})</li>' for i, p in enumerate(preds))
    body = [f"<h1>DINO-QPM predictions ({len(preds)} images)</h1>",
            f'<p class="muted">Model {esc(Path(result["model"]).name)}, {esc(str(result.get("precision")))}, input '
            f'{result["image_size"][0]}x{result["image_size"][1]}, {esc(result["providers"][0])}. {CONTRIBUTION_NOTE} '
            'Also in <a href="predictions.json">predictions.json</a>.</p>', f"<ul>{nav}</ul>"]
    if failed:
        body.append(f'<h2 id="failed" class="failed">Could not be read ({len(failed)})</h2><ul>'
                    + "".join(f'<li class="failed">{esc(f["error"])}</li>' for f in failed)
                    + "</ul>")
    body += [card(i, p) for i, p in enumerate(preds)]
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>DINO-QPM predictions</title>'
            f"<style>{PAGE_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path


def predict(model: Path, images: Sequence[str | Path], out: Path, *, provider: str = "cpu", top_k: int = 5,
            image_size: tuple[int, int] | None = None, batch_size: int = 8, force: bool = False) -> dict[str, Any]:
    """Run the graph on `images`, write the overlays and `out/predictions.json`, and return what was written."""
    files = collect_images(images)
    names = output_names(files)
    existing = [str(t) for t in [out / n for n in names] + [out / PREDICTIONS, out / PAGE] if t.exists()]
    if existing and not force:
        raise PredictError(f"{len(existing)} output file(s) exist already, e.g. {existing[0]}; pass --force to "
                           "overwrite them or choose another --out")
    session = open_session(model, provider)
    meta = read_metadata(session)
    size = tuple(meta["image_size"])
    if image_size is not None and tuple(image_size) != size:
        if not meta.get("input", {}).get("dynamic_image_size"):
            raise PredictError(f"the model was exported for {size[0]}x{size[1]} inputs only; --image-size needs an "
                               "export with --dynamic-image-size")
        multiple = int(meta["input"]["multiple_of"])
        if image_size[0] % multiple or image_size[1] % multiple:
            raise PredictError(f"--image-size must be multiples of {multiple}, got {image_size}")
        size = tuple(image_size)
    top_k = max(1, min(top_k, len(meta["classes"])))
    out.mkdir(parents=True, exist_ok=True)
    predictions: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for start in range(0, len(files), batch_size):
        part, pictures, part_names = read_batch(files[start:start + batch_size], names[start:start + batch_size],
                                                failed)
        if not part:
            continue
        batch = np.stack([to_input(p, size) for p in pictures])  # type: ignore[arg-type]
        logits, maps, features = session.run(["logits", "feature_maps", "features"], {"image": batch})
        for b, (path, picture, name) in enumerate(zip(part, pictures, part_names)):
            pred = {"image": str(path), **explain_one(logits[b], features[b], meta, top_k), "png": name}
            render(picture, maps[b], pred, path.name, out / name)
            predictions.append(pred)
    result = {"model": str(model), "providers": session.get_providers(), "image_size": list(size),
              "precision": meta.get("precision"), "num_images": len(files), "classes": meta["classes"],
              **({"fidelity": _fidelity(meta["int8_gate"])} if "int8_gate" in meta else {}),
              "contribution_rule": meta["head"].get("contribution"), "predictions": predictions,
              "num_failed": len(failed), "failed": failed}
    (out / PREDICTIONS).write_text(json.dumps(result, indent=2))
    write_page(result, out / PAGE)
    return result


def _fidelity(gate: dict[str, Any]) -> dict[str, Any]:
    """The int8 gate's headline numbers (vs the fp32 graph), from the `dinoqpm.int8_gate` metadata."""
    keys = ("passed", "forced", "n_images", "top1_agreement", "min_map_correlation", "mean_map_correlation",
            "rank_agreement", "accuracy_fp32", "accuracy_int8")
    return {k: gate.get(k) for k in keys}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python export/predict.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="the .onnx file written by export/to_onnx.py")
    parser.add_argument("--images", required=True, nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the PNGs and predictions.json")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    parser.add_argument("--top-k", type=int, default=5, help="classes listed per image")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size for a graph exported with --dynamic-image-size (default: its export size)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    args = parser.parse_args(argv)
    try:
        result = predict(args.model, args.images, args.out, provider=args.provider, top_k=args.top_k,
                         image_size=tuple(args.image_size) if args.image_size else None, batch_size=args.batch_size,
                         force=args.force)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in result["predictions"]:
        print(f"{p['image']}: {p['predicted_name']} (p = {p['probability']:.3f}) -> {args.out / p['png']}")
    for f in result["failed"]:
        print(f"error: {f['error']}", file=sys.stderr)
    print(f"wrote {len(result['predictions'])} PNG(s), {args.out / PREDICTIONS} and {args.out / PAGE} "
          f"({result['providers'][0]}, {result['precision']})"
          + (f"; {len(result['failed'])} image(s) could not be read" if result["failed"] else ""))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
