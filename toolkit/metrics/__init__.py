"""Interpretability metrics of DINO-QPM as pure functions over numpy arrays or torch tensors (docs/method.md#metrics).

Modules: `accuracy` (top-1, per class), `diversity` (SID@k), `features` (Class-Independence, Correlation),
`contrastiveness` (seeded 1-D GMM overlap), `plausibility` (mask overlap variants), `grounding` (Structural
Grounding) and `report` (`compute_all`, the flat dict written to metrics.json).
"""

from toolkit.metrics._common import MetricUndefined, predictions_from_logits, relevant_features
from toolkit.metrics.accuracy import accuracy, per_class_accuracy
from toolkit.metrics.contrastiveness import contrastiveness, fit_gmm_1d, gaussian_overlap
from toolkit.metrics.diversity import sid_at_k, sid_per_image, spatial_softmax, top_k_features
from toolkit.metrics.features import class_independence, class_shares, correlation
from toolkit.metrics.grounding import cosine_similarity_rows, structural_grounding
from toolkit.metrics.plausibility import (
    VARIANTS,
    dilate_masks,
    feature_peak_overlap,
    gradcam_maps,
    gradcam_mass_overlap,
    gradcam_peak_overlap,
    plausibility,
    segmentation_overlaps,
)
from toolkit.metrics.report import FEATURE_KEYS, MODELS, REPORTED, SID_K, compute_all, feature_part

__all__ = [
    "FEATURE_KEYS",
    "MODELS",
    "MetricUndefined",
    "REPORTED",
    "SID_K",
    "VARIANTS",
    "accuracy",
    "class_independence",
    "class_shares",
    "compute_all",
    "contrastiveness",
    "correlation",
    "cosine_similarity_rows",
    "dilate_masks",
    "feature_part",
    "feature_peak_overlap",
    "fit_gmm_1d",
    "gaussian_overlap",
    "gradcam_mass_overlap",
    "gradcam_maps",
    "gradcam_peak_overlap",
    "per_class_accuracy",
    "plausibility",
    "predictions_from_logits",
    "relevant_features",
    "segmentation_overlaps",
    "sid_at_k",
    "sid_per_image",
    "spatial_softmax",
    "structural_grounding",
    "top_k_features",
]
