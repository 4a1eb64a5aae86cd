"""Plausibility: how much of an explanation falls on the object, from object masks (docs/method.md#metrics).

Everything is computed on the maps' patch grid (16×16 for the default model): masks must already be resized to
(h, w) and are binarised at > 0, as the reference does for CUB. G⁺ is G dilated once by a 3×3 square, which adds
a one-patch border. Six overlap variants exist in the reference (`CUBSegmentationOverlapAccumulator`); each has
its own function and key here:

* `gradcam_mass_overlap` (keys `plausibility_gradcam[_dilated]`): Σ g·G / Σ g, the share of GradCAM mass on G.
* `gradcam_peak_overlap` (`plausibility_gradcam_max[_dilated]`): max(g·G) / max g.
* `feature_peak_overlap` (`plausibility_max[_dilated]`): mean over the class's features of max(M_j·G) / max M_j.

GradCAM is g = Σ_j W_ĉj M_j over the raw maps of the predicted class ĉ, shifted so that min g = 0. The reference uses
the head weight W and the raw maps (docs/method.md#metrics, and §6: "the μ/σ normalisation of the sparse head is not
applied"), so that is the default. A caller who wants the map that decomposes the QPM logit exactly passes the
effective weight W / σ (columns divided by the frozen feature std): since f_j = mean_p M_j(p),
ŷ_c = mean_p Σ_j (W_cj/σ_j) M_j(p) − const, and the min-shift removes the constant.

The repo never says which variant is the paper's "Plausibility". Like our method page (docs/method.md#metrics, "likely
candidate"), `plausibility` is the dilated GradCAM-mass variant; this is an unconfirmed choice. Images whose
denominator is 0 (a flat GradCAM, or a map with max ≤ 0) add 0 but still count, as in the reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from toolkit.metrics._common import as_float, as_labels, as_maps, chunks

VARIANTS = ("gradcam", "gradcam_dilated", "gradcam_max", "gradcam_max_dilated", "max", "max_dilated")


def binarise_masks(masks: Any) -> np.ndarray:
    """Object masks as booleans (> 0), shape (N, h, w)."""
    arr = as_float(masks, name="masks", ndim=3)
    return arr > 0


def dilate_masks(masks: Any, *, iterations: int = 1) -> np.ndarray:
    """Dilates each mask with a 3×3 square (8-neighbourhood), `iterations` times; nothing leaks across images.

    Args:
        masks: shape (N, h, w), binarised at > 0.
        iterations: number of dilations (1 in the reference code).

    Returns:
        bool array, shape (N, h, w).
    """
    structure = np.ones((1, 3, 3), dtype=bool)  # no extent along N, so images stay independent
    return ndimage.binary_dilation(binarise_masks(masks), structure=structure, iterations=iterations)


def gradcam_maps(maps: Any, head_weight: Any, predictions: Any) -> np.ndarray:
    """GradCAM of the predicted class: g = Σ_j W_ĉj M_j, then g ← g − min g.

    Args:
        maps: feature maps, shape (N, F, h, w).
        head_weight: shape (C, F); pass W / σ for the logit-faithful map of a QPM head (see module doc).
        predictions: predicted classes, shape (N,).

    Returns:
        float64 array, shape (N, h, w), each map with minimum 0.
    """
    w = as_float(head_weight, name="head_weight", ndim=2)
    m = as_maps(maps, n_features=w.shape[1])
    rows = w[as_labels(predictions, name="predictions", n=m.shape[0])]
    out = np.empty((m.shape[0], m.shape[2], m.shape[3]))
    for part in chunks(m.shape[0], int(np.prod(m.shape[1:]))):
        out[part] = np.einsum("nf,nfhw->nhw", rows[part], np.asarray(m[part], dtype=np.float64))
    return out - out.min(axis=(1, 2), keepdims=True)


def _checked_masks(masks: Any, maps: np.ndarray, dilate: bool) -> np.ndarray:
    g = dilate_masks(masks) if dilate else binarise_masks(masks)
    if g.shape != (maps.shape[0], *maps.shape[2:]):
        raise ValueError(f"masks of shape {g.shape} do not match maps {maps.shape} (resize them to the patch grid)")
    return g


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den where den > 0, else 0 (the reference adds 0 for such images)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _gradcam_overlaps(cam: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image mass share and peak share of GradCAM maps (N, h, w) on masks (N, h, w)."""
    on = cam * g
    mass = _ratio(on.sum(axis=(1, 2)), cam.sum(axis=(1, 2)))
    peak = _ratio(on.max(axis=(1, 2)), cam.max(axis=(1, 2)))
    return mass, peak


def gradcam_mass_overlap(maps: Any, head_weight: Any, predictions: Any, masks: Any, *, dilate: bool = False) -> float:
    """Share of GradCAM mass inside the object mask, mean over images: mean_n Σ g_n·G_n / Σ g_n.

    Args:
        maps: feature maps, shape (N, F, h, w).
        head_weight: shape (C, F).
        predictions: predicted classes, shape (N,).
        masks: object masks on the maps' grid, shape (N, h, w).
        dilate: use G⁺ (3×3-dilated mask) instead of G.

    Returns:
        A fraction in [0, 1].
    """
    m = as_maps(maps)
    mass, _ = _gradcam_overlaps(gradcam_maps(m, head_weight, predictions), _checked_masks(masks, m, dilate))
    return float(mass.mean())


def gradcam_peak_overlap(maps: Any, head_weight: Any, predictions: Any, masks: Any, *, dilate: bool = False) -> float:
    """GradCAM peak inside the mask relative to its global peak, mean over images: mean_n max(g_n·G_n) / max g_n.

    Args:
        maps: feature maps, shape (N, F, h, w).
        head_weight: shape (C, F).
        predictions: predicted classes, shape (N,).
        masks: object masks on the maps' grid, shape (N, h, w).
        dilate: use G⁺ instead of G.

    Returns:
        A fraction in [0, 1].
    """
    m = as_maps(maps)
    _, peak = _gradcam_overlaps(gradcam_maps(m, head_weight, predictions), _checked_masks(masks, m, dilate))
    return float(peak.mean())


def _feature_peak_scores(m: np.ndarray, rows: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Per image, mean over features with W_ĉj ≠ 0 of max(M_j·G)/max M_j (0 where max M_j ≤ 0 or no feature)."""
    out = np.zeros(m.shape[0])
    for part in chunks(m.shape[0], int(np.prod(m.shape[1:]))):
        x = np.asarray(m[part], dtype=np.float64)
        peak = x.max(axis=(2, 3))
        inside = (x * g[part][:, None]).max(axis=(2, 3))
        score = _ratio(inside, peak)
        used = rows[part] != 0
        out[part] = _ratio((score * used).sum(axis=1), used.sum(axis=1).astype(np.float64))
    return out


def feature_peak_overlap(maps: Any, head_weight: Any, predictions: Any, masks: Any, *, dilate: bool = False) -> float:
    """Per-feature peak inside the mask: mean_n mean_{j: W_ĉj ≠ 0} max(M_nj·G_n) / max M_nj.

    Args:
        maps: feature maps, shape (N, F, h, w).
        head_weight: shape (C, F); its nonzero pattern picks the features of each predicted class.
        predictions: predicted classes, shape (N,).
        masks: object masks on the maps' grid, shape (N, h, w).
        dilate: use G⁺ instead of G.

    Returns:
        A fraction in [0, 1] (for maps whose peak is positive).
    """
    w = as_float(head_weight, name="head_weight", ndim=2)
    m = as_maps(maps, n_features=w.shape[1])
    rows = w[as_labels(predictions, name="predictions", n=m.shape[0])]
    return float(_feature_peak_scores(m, rows, _checked_masks(masks, m, dilate)).mean())


def segmentation_overlaps(maps: Any, head_weight: Any, predictions: Any, masks: Any) -> dict[str, float]:
    """All six overlap variants in one pass, keyed `plausibility_<variant>` (see `VARIANTS`).

    Args:
        maps: feature maps, shape (N, F, h, w).
        head_weight: shape (C, F).
        predictions: predicted classes, shape (N,).
        masks: object masks on the maps' grid, shape (N, h, w).

    Returns:
        Six fractions; `plausibility_gradcam_dilated` is the primary `plausibility`.
    """
    w = as_float(head_weight, name="head_weight", ndim=2)
    m = as_maps(maps, n_features=w.shape[1])
    pred = as_labels(predictions, name="predictions", n=m.shape[0])
    cam = gradcam_maps(m, w, pred)
    out: dict[str, float] = {}
    for dilate in (False, True):
        g = _checked_masks(masks, m, dilate)
        suffix = "_dilated" if dilate else ""
        mass, peak = _gradcam_overlaps(cam, g)
        out[f"plausibility_gradcam{suffix}"] = float(mass.mean())
        out[f"plausibility_gradcam_max{suffix}"] = float(peak.mean())
        out[f"plausibility_max{suffix}"] = float(_feature_peak_scores(m, w[pred], g).mean())
    return out


def plausibility(maps: Any, head_weight: Any, predictions: Any, masks: Any) -> float:
    """Primary Plausibility: the dilated GradCAM-mass overlap, mean_n Σ g_n·G⁺_n / Σ g_n (docs/method.md#metrics).

    Args:
        maps: feature maps, shape (N, F, h, w).
        head_weight: shape (C, F).
        predictions: predicted classes, shape (N,).
        masks: object masks on the maps' grid, shape (N, h, w).

    Returns:
        A fraction in [0, 1].
    """
    return gradcam_mass_overlap(maps, head_weight, predictions, masks, dilate=True)
