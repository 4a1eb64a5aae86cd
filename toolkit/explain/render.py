"""PNG rendering of the explanation views with matplotlib's object API (no pyplot state, no display needed).

Maps are shown as the reference shows them (docs/method.md#explanations): the raw adapter map on the patch grid,
bilinearly upsampled to the displayed image (a square resize of the input, which is exactly what the model saw), min-max
normalised, then overlaid with the jet colormap at an opacity proportional to the activation. Figures have a fixed
size in pixels (`*_figure_px`), so callers and tests know what they get.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from toolkit.explain.views import ContrastExplanation, GlobalExplanation, LocalExplanation

DPI = 100
PANEL_IN = 2.0  # side of one image panel, inches
DISPLAY_PX = 224  # images are redrawn at this side so small inputs (56 px) stay legible
MAX_ALPHA = 0.75  # opacity of a map at its maximum
COMBINED_THRESHOLD = 0.2  # the combined overlay leaves pixels whose strongest feature is below this uncoloured
# zlib level of every PNG written here: level 1 encodes about 3x faster than the default 6 for ~20 % larger files,
# which is most of a report's build time on a 2-core machine.
PNG_COMPRESSION = 1


def display_image(image: Image.Image, size: int = DISPLAY_PX) -> np.ndarray:
    """The image as the model saw it (square resize, no crop), as uint8 (size, size, 3)."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))


def upsample(grid_map: np.ndarray, size: int = DISPLAY_PX) -> np.ndarray:
    """Bilinear upsampling of one (h, w) map to (size, size), float32."""
    m = np.asarray(grid_map, dtype=np.float32)
    return np.asarray(Image.fromarray(m, mode="F").resize((size, size), Image.BILINEAR))


def normalise(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Min-max to [0, 1] (a flat map becomes 0); `lo`/`hi` fix the range, e.g. to share it between panels."""
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)


def heat_rgba(norm: np.ndarray) -> np.ndarray:
    """Jet colours with opacity proportional to the normalised activation, (S, S, 4)."""
    rgba = colormaps["jet"](norm)
    rgba[..., 3] = MAX_ALPHA * norm
    return rgba


def _wrap(text: str, width_in: float, fontsize: float = 9) -> str:
    """Wraps a title to the figure width (about 1.7 characters per point of width at this font size)."""
    return textwrap.fill(text, width=max(20, int(width_in * 72 / (0.55 * fontsize))))


def _blank(ax: object) -> None:
    ax.set_xticks([])  # type: ignore[attr-defined]
    ax.set_yticks([])  # type: ignore[attr-defined]


def _feature_colours(n: int) -> np.ndarray:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return np.asarray([cmap(i % cmap.N) for i in range(n)])


def combined_rgba(maps: list[np.ndarray], colours: np.ndarray) -> np.ndarray:
    """All maps in one overlay: each pixel takes the colour of its strongest (normalised) feature.

    Args:
        maps: m upsampled maps, each (S, S).
        colours: (m, 4) RGBA colours.

    Returns:
        (S, S, 4); pixels whose strongest feature is below COMBINED_THRESHOLD stay transparent.
    """
    norm = np.stack([normalise(m) for m in maps])
    top = norm.argmax(axis=0)
    strength = norm.max(axis=0)
    rgba = colours[top].copy()
    rgba[..., 3] = np.where(strength >= COMBINED_THRESHOLD, 0.8 * strength, 0.0)
    return rgba


def local_figure_px(m: int) -> tuple[int, int]:
    """(width, height) in pixels of a local explanation with m features."""
    w, h = _local_size(m)
    return round(w * DPI), round(h * DPI)


def _local_size(m: int) -> tuple[float, float]:
    return max(6.0, (m + 2) * PANEL_IN), PANEL_IN + 0.8 + (0.9 + 0.3 * m)


def render_local(expl: LocalExplanation, image: Image.Image, path: Path) -> Path:
    """One PNG: the image, one overlay per feature (contribution in the title), the combined overlay, and a bar
    chart of the contributions that add up to the logit.

    Args:
        expl: the explanation.
        image: the input image (any size; shown square as the model saw it).
        path: where the PNG goes.
    """
    m = len(expl.features)
    base = display_image(image)
    maps = [upsample(np.asarray(g)) for g in expl.maps]
    colours = _feature_colours(m)
    width, height = _local_size(m)
    fig = Figure(figsize=(width, height), dpi=DPI)
    # Fixed margins in inches: room for the title and two-line panel titles above, tick labels left of the bars.
    img_top, img_bottom = 1 - 0.8 / height, 1 - (0.8 + PANEL_IN * 0.95) / height
    gs = fig.add_gridspec(1, m + 2, left=0.01, right=0.99, top=img_top, bottom=img_bottom, wspace=0.06)
    bar_gs = fig.add_gridspec(1, 1, left=1.9 / width, right=0.97, top=img_bottom - 0.3 / height,
                              bottom=0.55 / height)
    truth = "" if expl.label_name is None else f" (true: {expl.label_name})"
    title = (f"{Path(expl.image).name}: predicted {expl.predicted_name}{truth}, p = {expl.probability:.2f}, "
             f"logit {expl.logit:+.2f} = sum of {m} contributions")
    fig.suptitle(_wrap(title, width, 10), fontsize=10, y=1 - 0.08 / height, va="top")
    ax = fig.add_subplot(gs[0, 0])
    ax.imshow(base)
    ax.set_title("input", fontsize=8)
    _blank(ax)
    for i, (feat, up) in enumerate(zip(expl.features, maps)):
        ax = fig.add_subplot(gs[0, i + 1])
        ax.imshow(base)
        ax.imshow(heat_rgba(normalise(up)))
        ax.set_title(f"f{feat.feature} (ch {feat.channel})\n{feat.contribution:+.2f}", fontsize=8,
                     color=colours[i])
        _blank(ax)
    ax = fig.add_subplot(gs[0, m + 1])
    ax.imshow(base)
    ax.imshow(combined_rgba(maps, colours))
    ax.set_title("combined\n(colours as titles)", fontsize=8)
    _blank(ax)
    bars = fig.add_subplot(bar_gs[0, 0])
    labels = [f"f{f.feature}  act {f.activation:.2f}" for f in expl.features]
    values = [f.contribution for f in expl.features]
    bars.barh(range(m), values, color=colours)
    bars.set_yticks(range(m), labels, fontsize=7)
    bars.invert_yaxis()
    bars.axvline(0.0, color="black", linewidth=0.8)
    bars.tick_params(axis="x", labelsize=7)
    bars.set_xlabel(f"contribution (W·(f − μ)/σ); sum = {expl.contribution_sum:+.3f} = logit of "
                    f"{expl.predicted_name}", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESSION})
    return path


def _global_layout(expl: GlobalExplanation) -> tuple[float, float, float, float, float]:
    n_classes, k = len(expl.classes), len(expl.selection)
    cell = 0.28 if max(n_classes, k) <= 60 else max(0.06, 14.0 / max(n_classes, k))
    left = 0.3 + 0.07 * max(len(c) for c in expl.classes) if n_classes <= 80 else 0.5
    top, bar, bottom = 0.6, 0.8, 0.7
    return cell, left, top, bar, bottom


def global_figure_px(expl: GlobalExplanation) -> tuple[int, int]:
    """(width, height) in pixels of `render_global`'s figure."""
    cell, left, top, bar, bottom = _global_layout(expl)
    w = left + len(expl.selection) * cell + 0.3
    h = top + bar + len(expl.classes) * cell + bottom
    return round(max(w, 4.0) * DPI), round(h * DPI)


def render_global(expl: GlobalExplanation, path: Path) -> Path:
    """The class x feature matrix in seriated order, with each feature's number of classes on top."""
    cell, left, top, bar, bottom = _global_layout(expl)
    wpx, hpx = global_figure_px(expl)
    width, height = wpx / DPI, hpx / DPI
    w = np.asarray(expl.weight)[np.ix_(expl.class_order, expl.feature_order)]
    n_classes, k = w.shape
    fig = Figure(figsize=(width, height), dpi=DPI)
    mat_h = n_classes * cell
    ax = fig.add_axes((left / width, bottom / height, k * cell / width, mat_h / height))
    ax.imshow(w, cmap="Greys", vmin=0, vmax=1.4, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(k + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_classes + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=0.4)
    ax.tick_params(which="minor", length=0)
    if n_classes <= 80:
        ax.set_yticks(range(n_classes), [expl.classes[c] for c in expl.class_order], fontsize=7)
    else:
        ax.set_yticks([])
    ax.set_xticks(range(k), [f"f{j}" for j in expl.feature_order], fontsize=6, rotation=90)
    ax.set_xlabel("feature (column of W), seriated", fontsize=8)
    deg = np.asarray(expl.degree)[expl.feature_order]
    axd = fig.add_axes((left / width, (bottom + mat_h + 0.1) / height, k * cell / width, (bar - 0.2) / height))
    axd.bar(range(k), deg, color=["#c0392b" if d > 1 else "#7f8c8d" for d in deg], width=0.8)
    axd.set_xlim(-0.5, k - 0.5)
    axd.set_xticks([])
    axd.tick_params(axis="y", labelsize=6)
    axd.set_ylabel("classes", fontsize=7)
    used = expl.n_used
    cols = f"{used} features" if used == k else f"{used} features used (of {k} columns)"
    fig.suptitle(f"{n_classes} classes x {cols}, {expl.n_per_class} per class (red: shared features)",
                 fontsize=9, y=1 - 0.15 / height, va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESSION})
    return path


def contrast_figure_px(n_columns: int) -> tuple[int, int]:
    """(width, height) in pixels of a contrast figure with `n_columns` features."""
    return round(max(4.0, n_columns * PANEL_IN + 0.6) * DPI), round((2 * (PANEL_IN + 0.5) + 0.9) * DPI)


def render_contrast(expl: ContrastExplanation, load_image: Callable[[int], Image.Image], path: Path) -> Path:
    """Two rows (the classes) by one column per feature: a's own, shared, b's own.

    Each cell shows the feature's map on the image of that row's class where the feature is strongest; the two
    cells of a column share one colour range, so a distinguishing feature visibly fades in the other class.

    Args:
        expl: the explanation, with examples.
        load_image: sample index -> image.
        path: where the PNG goes.
    """
    cols = expl.columns
    wpx, hpx = contrast_figure_px(len(cols))
    fig = Figure(figsize=(wpx / DPI, hpx / DPI), dpi=DPI)
    gs = fig.add_gridspec(2, max(1, len(cols)), left=0.6 / (wpx / DPI), right=0.99, top=1 - 1.1 / (hpx / DPI),
                          bottom=0.02, hspace=0.25, wspace=0.08)
    title = (f"{expl.name_a} vs {expl.name_b}: {len(expl.shared)} shared, {len(expl.only_a)} + {len(expl.only_b)} "
             f"distinguishing features; {expl.reason}")
    fig.suptitle(_wrap(title, wpx / DPI), fontsize=9)
    images: dict[int, np.ndarray] = {}
    for ci, j in enumerate(cols):
        kind = "shared" if j in expl.shared else (f"only {expl.name_a}" if j in expl.only_a else
                                                  f"only {expl.name_b}")
        cells = [expl.example(j, c) for c in (expl.class_a, expl.class_b)]
        ups = [upsample(np.asarray(e.map)) if e is not None else None for e in cells]
        present = [u for u in ups if u is not None]
        lo = min(float(u.min()) for u in present) if present else 0.0
        hi = max(float(u.max()) for u in present) if present else 1.0
        for ri, (e, up) in enumerate(zip(cells, ups)):
            ax = fig.add_subplot(gs[ri, ci])
            _blank(ax)
            if ri == 0:
                colour = "#7f8c8d" if kind == "shared" else "#c0392b"
                ax.set_title(f"{kind}\nf{j}", fontsize=8, color=colour, pad=14)
            if ci == 0:
                ax.set_ylabel([expl.name_a, expl.name_b][ri], fontsize=8)
            if e is None or up is None:
                ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                continue
            if e.sample not in images:
                images[e.sample] = display_image(load_image(e.sample))
            ax.imshow(images[e.sample])
            ax.imshow(heat_rgba(normalise(up, lo, hi)))
            ax.text(0.5, 1.01, f"f = {e.activation:.2f}  ({e.image[-18:]})", ha="center", va="bottom", fontsize=7,
                    transform=ax.transAxes)
    if not cols:
        fig.text(0.5, 0.5, "the two classes use no features", ha="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESSION})
    return path

