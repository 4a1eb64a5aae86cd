"""`python -m toolkit.explain --run RUN_DIR --images PATH... [--out DIR]`: local explanations of new images.

The backbone runs live on the images (no token cache), built from the run's config.yaml and preprocessed with the
checkpoint's own mean/std, so the model sees the images exactly as it saw its training data. Writes one PNG per
image (`render_local`) and `predictions.json` into DIR (default RUN_DIR/explanations/added). When the run has a
report (explanations/index.json), the views are also added to RUN_DIR/report.html (section "Added images"; PNGs
written elsewhere are copied beside the page). Every image is opened and every output name checked before the
backbone is built, so a bad path fails in a second, not after the model has run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from toolkit.config import load_config
from toolkit.data import make_transform
from toolkit.distributed import seed_everything
from toolkit.explain.html import ADDED, write_html
from toolkit.explain.render import render_local
from toolkit.explain.views import explain_tokens
from toolkit.files import write_json
from toolkit.model import DinoQPM, SparseHead, create_backbone, join_tokens, load_checkpoint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PREDICTIONS = "predictions.json"


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (recursively, sorted); missing paths are errors."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CliError(f"folder {p} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise CliError(f"image file {p} does not exist")
    return out


def open_image(path: Path) -> Image.Image:
    """The image as RGB, fully decoded; a corrupt or non-image file raises CliError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CliError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e


def output_names(images: Sequence[Path]) -> list[str]:
    """`<stem>.png` per image; repeated stems get `_2`, `_3`, ... in input order."""
    seen: dict[str, int] = {}
    names = []
    for p in images:
        n = seen.get(p.stem, 0) + 1
        seen[p.stem] = n
        names.append(f"{p.stem}.png" if n == 1 else f"{p.stem}_{n}.png")
    return names


def load_run_model(run_dir: Path) -> tuple[DinoQPM, dict[str, Any], Any]:
    """The run's DINO-QPM model (eval mode), its checkpoint info and the run config."""
    if not run_dir.is_dir():
        raise CliError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise CliError(f"{run_dir / 'config.yaml'} is missing: --run must be a run directory written by the pipeline")
    model, info = load_checkpoint(run_dir / "checkpoint")
    if not isinstance(model, DinoQPM) or not isinstance(model.head, SparseHead):
        raise CliError(f"{run_dir / 'checkpoint'} holds a {info.get('kind')} model; explanations need the QPM one")
    return model, info, load_config(run_dir / "config.yaml")


def explain_images(run_dir: Path, images: Sequence[str | Path], out: Path, *, force: bool = False,
                   batch_size: int = 16, device: str = "cpu") -> dict[str, Any]:
    """Explain `images` with the run's model; returns what was written to `out / predictions.json`.

    Raises:
        CliError: a missing or unreadable image, an existing output without `force`, or a run without the model.
    """
    files = collect_images(images)
    pictures = [open_image(p) for p in files]
    names = output_names(files)
    targets = [out / n for n in names] + [out / PREDICTIONS]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise CliError(f"{len(existing)} output file(s) exist already, e.g. {existing[0]}; pass --force to "
                       "overwrite them or choose another --out")
    model, info, cfg = load_run_model(run_dir)
    if info.get("backbone") != cfg.backbone.name:
        raise CliError(f"checkpoint was trained on {info.get('backbone')} tokens but config.yaml names "
                       f"{cfg.backbone.name}")
    seed_everything(cfg.runtime.seed)  # the pipeline seeds before building; random-init test backbones need it
    backbone = create_backbone(cfg.backbone, int(info["image_size"]), model_kwargs=cfg.backbone.arch_overrides())
    if info.get("weights_hash") not in (None, backbone.weights_hash):
        raise CliError(f"the backbone weights ({backbone.weights_hash}) differ from the ones the model was trained "
                       f"on ({info['weights_hash']})")
    dev = torch.device(device)
    backbone, model = backbone.to(dev), model.to(dev)
    transform = make_transform(image_size=int(info["image_size"]), mean=info["mean"], std=info["std"],
                               reference_minmax=bool(info.get("reference_minmax", False)),
                               interpolation=info.get("interpolation", "bicubic"))
    classes = list(info["classes"])
    out.mkdir(parents=True, exist_ok=True)
    predictions = []
    for start in range(0, len(files), batch_size):
        part = slice(start, start + batch_size)
        batch = torch.stack([transform(im) for im in pictures[part]]).to(dev)
        patch, cls = backbone.tokens(batch)
        for expl, pic, name in zip(explain_tokens(model, join_tokens(patch.float(), cls.float()), classes=classes,
                                                  images=[str(p) for p in files[part]]),
                                   pictures[part], names[part]):
            render_local(expl, pic, out / name)
            predictions.append({**expl.to_dict(maps=False), "png": name})
    result = {"run_dir": str(run_dir), "num_images": len(files), "classes": classes, "predictions": predictions}
    write_json(out / PREDICTIONS, result)
    return result


def added_dir(run_dir: Path) -> Path:
    """Where added local views live beside the run's report.html."""
    return Path(run_dir) / "explanations" / "added"


def add_to_report(run_dir: Path, out: Path, result: dict[str, Any]) -> Path | None:
    """Records `result`'s views in run_dir/explanations/added.json and rewrites report.html; None when the run has no
    report yet. PNGs outside `added_dir` are copied in, under a free name (an earlier added view is never
    overwritten unless it is the same file)."""
    ex = Path(run_dir) / "explanations"
    if not (ex / "index.json").is_file():
        return None
    dest = added_dir(run_dir)
    dest.mkdir(parents=True, exist_ok=True)
    entries = json.loads((ex / ADDED).read_text())["predictions"] if (ex / ADDED).is_file() else []
    in_place = out.resolve() == dest.resolve()
    for p in result["predictions"]:
        name = p["png"]
        if not in_place:
            taken = {e["png"] for e in entries} | {q.name for q in dest.iterdir()}
            stem, n = Path(name).stem, 1
            while name in taken:
                n += 1
                name = f"{stem}_{n}.png"
            shutil.copyfile(out / p["png"], dest / name)
        entries = [e for e in entries if e["png"] != name] + [{**p, "png": name}]
    write_json(ex / ADDED, {"predictions": entries})
    return write_html(run_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.explain", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="run directory (holds config.yaml, checkpoint/)")
    parser.add_argument("--images", required=True, nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", type=Path, help="output folder for the PNGs and predictions.json (default: "
                        "RUN/explanations/added, beside the run's report.html)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    args = parser.parse_args(argv)
    out = args.out or added_dir(args.run)
    try:
        result = explain_images(args.run, args.images, out, force=args.force, batch_size=args.batch_size,
                                device=args.device)
        page = add_to_report(args.run, out, result)
    except (CliError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in result["predictions"]:
        print(f"{p['image']}: {p['predicted_name']} (p = {p['probability']:.3f}) -> {out / p['png']}")
    print(f"wrote {len(result['predictions'])} PNG(s) and {out / PREDICTIONS}"
          + (f"; added them to {page}" if page else "; the run has no report.html yet (evaluate it first)"))
    return 0
