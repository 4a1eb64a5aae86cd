"""The feature atlas: what each selected feature of a DINO-QPM model *is*, shown through the training images where it
fires most (the QPM papers' way of presenting a feature, arXiv 2604.07166; docs/method.md#explanations).

For every column j of the sparse head the atlas holds
* the `top_n` training images with the highest pooled activation f_j (the mean of the map, before the head's
  standardisation), each drawn with the feature's map over it;
* the classes that use it (W_cj = 1) and their weights;
* the distribution of f_j over the training images of every class (quantiles and mean): the numbers behind class
  independence and contrastiveness (docs/method.md#metrics). A feature that is high for its own classes and low for
  the rest has a box that stands out for those classes.

Everything is computed from the cached train tokens (no backbone pass): one head-input pass over the split, then
the maps of the chosen images only. The images themselves come from the dataset, for display.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toolkit.cache import TokenStore
from toolkit.explain.render import PNG_COMPRESSION, display_image, heat_rgba, normalise, upsample
from toolkit.model import DinoQPM, SparseHead
from toolkit.train import evaluate, store_maps

TOP_N = 8  # training images per feature
TILE_PX = 128  # side of one atlas tile
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class AtlasExample:
    """One training image where a feature is strong: its sample index in the cached split, id, class, f_j."""

    sample: int
    image: str
    label: int
    label_name: str
    activation: float


@dataclass(frozen=True)
class FeatureCard:
    """One selected feature.

    Attributes:
        feature: column j of the head's W; channel: the adapter channel behind it.
        used_by: classes c with W_cj != 0, as indices; used_by_names: their names; weights: those W_cj.
        mean, std: the head's standardisation μ_j, σ_j (f_j is standardised as (f_j − μ_j)/σ_j before W).
        examples: the top-n training images, strongest first.
        per_class: per class (index = class) the `QUANTILES` and mean of f_j over that class's training images.
        png: the strip of example tiles, relative to the explanations folder.
    """

    feature: int
    channel: int
    used_by: list[int]
    used_by_names: list[str]
    weights: list[float]
    mean: float
    std: float
    examples: list[AtlasExample]
    per_class: list[dict[str, float]]
    png: str


@dataclass(frozen=True)
class Atlas:
    """The atlas of all k features of a model on one cached split."""

    classes: list[str]
    split: str
    n_images: int
    top_n: int
    quantiles: list[float]
    features: list[FeatureCard]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def raw_features(model: DinoQPM, store: TokenStore, *, batch_size: int = 256) -> np.ndarray:
    """Pooled activations f of every cached sample, (N, k): the head's inputs z = (f − μ)/σ mapped back."""
    assert isinstance(model.head, SparseHead)
    dev = next(model.parameters()).device
    out = evaluate(model, store.dataset(), batch_size=batch_size, device=dev, head_inputs=True)
    assert out.features is not None
    std = model.head.std.clamp_min(1e-6).cpu().numpy()
    return out.features * std + model.head.mean.cpu().numpy()


def top_samples(features: np.ndarray, top_n: int) -> np.ndarray:
    """(k, min(top_n, N)) sample indices, strongest first per column (ties: lower index first)."""
    order = np.argsort(-features, axis=0, kind="stable")
    return order[:top_n].T


def class_quantiles(values: np.ndarray, labels: np.ndarray, n_classes: int) -> list[dict[str, float]]:
    """Per class: the `QUANTILES` (keys q5, q25, ...) and mean of `values` (N,); empty dict for a class without
    samples."""
    out = []
    for c in range(n_classes):
        v = values[labels == c]
        if not v.size:
            out.append({})
            continue
        qs = np.quantile(v, QUANTILES)
        out.append({**{f"q{round(100 * q)}": float(x) for q, x in zip(QUANTILES, qs)}, "mean": float(v.mean())})
    return out


def build_atlas(model: DinoQPM, store: TokenStore, *, split: str = "train", top_n: int = TOP_N
                ) -> tuple[Atlas, dict[int, np.ndarray]]:
    """The atlas of `model` on a cached split, and the maps of the example images.

    Args:
        model: the DINO-QPM model with its sparse head.
        store: the cached split (the training split for the atlas of the report).
        split: its name, recorded in the atlas.
        top_n: example images per feature.

    Returns:
        (atlas, maps) with maps[sample] of shape (k, h, w) for every example image (PNG paths are filled in as
        `atlas/f{j}.png`; `render_atlas` writes them).
    """
    head = model.head
    if not isinstance(head, SparseHead):
        raise ValueError("the feature atlas needs the DINO-QPM model with its sparse head, not the dense model")
    classes = list(store.classes)
    feats = raw_features(model, store)
    labels = np.asarray(store.labels)
    ids = list(store.meta["ids"])
    tops = top_samples(feats, top_n)
    samples = np.unique(tops)
    maps = dict(zip(samples.tolist(), store_maps(model, store, samples))) if samples.size else {}
    weight = head.weight.detach().cpu().numpy()
    std = head.std.clamp_min(1e-6).cpu().numpy()
    cards = []
    for j in range(weight.shape[1]):
        users = np.flatnonzero(weight[:, j]).tolist()
        examples = [AtlasExample(sample=int(s), image=str(ids[s]), label=int(labels[s]),
                                 label_name=classes[int(labels[s])], activation=float(feats[s, j])) for s in tops[j]]
        cards.append(FeatureCard(feature=j, channel=int(head.selection[j]), used_by=users,
                                 used_by_names=[classes[c] for c in users],
                                 weights=[float(weight[c, j]) for c in users], mean=float(head.mean[j]),
                                 std=float(std[j]), examples=examples,
                                 per_class=class_quantiles(feats[:, j], labels, len(classes)), png=f"atlas/f{j}.png"))
    atlas = Atlas(classes=classes, split=split, n_images=len(labels), top_n=int(tops.shape[1]),
                  quantiles=list(QUANTILES), features=cards)
    return atlas, maps


def overlay(image: Image.Image, grid_map: np.ndarray, lo: float, hi: float, size: int = TILE_PX) -> np.ndarray:
    """The image (square, as the model saw it) with one map over it in jet colours, uint8 (size, size, 3).

    `lo`/`hi` fix the colour range so tiles of one feature share it."""
    base = display_image(image, size).astype(np.float32)
    rgba = heat_rgba(normalise(upsample(grid_map, size), lo, hi))
    alpha = rgba[..., 3:4]
    return np.clip(base * (1 - alpha) + 255.0 * rgba[..., :3] * alpha, 0, 255).round().astype(np.uint8)


def render_atlas(atlas: Atlas, maps: dict[int, np.ndarray], image_of: Callable[[int], Image.Image], out: Path, *,
                 tile: int = TILE_PX) -> list[Path]:
    """One PNG strip per feature in `out` (at each card's `png`): its example images left to right, strongest first,
    each with the feature's map over it. The tiles of one strip share one colour range (the min and max of their
    upsampled maps), so a weaker example also looks weaker.

    Args:
        atlas: from `build_atlas`.
        maps: sample -> (k, h, w) maps, from `build_atlas`.
        image_of: sample index -> PIL image of the same split.
        out: the explanations folder.
        tile: side of one tile in pixels.
    """
    cache: dict[int, Image.Image] = {}
    written = []
    gap = 4
    for card in atlas.features:
        ups = [upsample(maps[e.sample][card.feature], tile) for e in card.examples]
        lo = min((float(u.min()) for u in ups), default=0.0)
        hi = max((float(u.max()) for u in ups), default=1.0)
        strip = Image.new("RGB", (max(1, len(ups)) * (tile + gap) - gap, tile), "white")
        for i, e in enumerate(card.examples):
            if e.sample not in cache:
                cache[e.sample] = image_of(e.sample)
            arr = overlay(cache[e.sample], maps[e.sample][card.feature], lo, hi, tile)
            strip.paste(Image.fromarray(arr), (i * (tile + gap), 0))
        path = out / card.png
        path.parent.mkdir(parents=True, exist_ok=True)
        strip.save(path, format="PNG", compress_level=PNG_COMPRESSION)
        written.append(path)
    return written


def thumbnails(images: Sequence[Image.Image], path: Path, *, tile: int = TILE_PX) -> Path:
    """A strip of plain images (as the model saw them) side by side, as one PNG."""
    gap = 4
    strip = Image.new("RGB", (max(1, len(images)) * (tile + gap) - gap, tile), "white")
    for i, im in enumerate(images):
        strip.paste(Image.fromarray(display_image(im, tile)), (i * (tile + gap), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path, format="PNG", compress_level=PNG_COMPRESSION)
    return path
