"""`compute_all`: every metric computable from the given arrays, as the flat JSON-able dict of metrics.json."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from toolkit.metrics._common import (
    MetricUndefined,
    as_float,
    as_labels,
    as_maps,
    predictions_from_logits,
    relevant_features,
)
from toolkit.metrics.accuracy import accuracy, per_class_accuracy
from toolkit.metrics.contrastiveness import contrastiveness
from toolkit.metrics.diversity import sid_at_k
from toolkit.metrics.features import class_independence, correlation
from toolkit.metrics.grounding import structural_grounding
from toolkit.metrics.plausibility import segmentation_overlaps

# The models every run reports, and the metrics.json keys (with their report columns) written for each of them,
# null when undefined.
MODELS = ("linear_probe", "dense", "dino_qpm")
SID_K = 5
REPORTED = (("accuracy", "accuracy"), (f"sid_at_{SID_K}", f"SID@{SID_K}"), ("class_independence", "class indep."),
            ("contrastiveness", "contrastiveness"), ("correlation", "correlation (lower = better)"),
            ("plausibility", "plausibility"), ("structural_grounding", "struct. grounding"))
# The metrics of `features` alone (not of the evaluation images): `feature_metrics` carries them between calls.
FEATURE_KEYS = ("class_independence", "contrastiveness", "correlation")


def _finite_or_none(x: float) -> float | None:
    """JSON has no NaN: undefined values become null."""
    return None if math.isnan(x) else float(x)


def feature_part(metrics: dict[str, Any]) -> dict[str, Any]:
    """The feature metrics of a `compute_all` output (with their "undefined" reasons): its `feature_metrics`."""
    out = {key: metrics[key] for key in FEATURE_KEYS if metrics.get(key) is not None}
    why = {key: r for key, r in metrics.get("undefined", {}).items() if key in FEATURE_KEYS}
    return {**out, "undefined": why} if why else out


def compute_all(*, logits: Any, labels: Any, maps: Any, features: Any, head_weight: Any, masks: Any = None,
                k: int = 5, seed: int = 0, feature_labels: Any = None,
                class_attributes: Any = None, feature_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Computes every metric the inputs allow and returns them under their metrics.json names.

    Map metrics (SID@k, plausibility) use the evaluation images behind `logits`; feature metrics
    (class_independence, contrastiveness, correlation) use `features`, restricted to the head's used columns
    (nonzero weight somewhere), as the reference does (docs/method.md#metrics). The paper computes feature metrics on
    the train set: pass train features with their `feature_labels` for that; without `feature_labels` the features
    must belong to the same images as `logits` and `labels` are used.

    The three models of the paper's table map onto the inputs as follows:

    * linear probe: maps = raw patch tokens (N, D, h, w), features = CLS tokens (N', D), head_weight (C, D);
    * dense model: maps (N, F, h, w), pooled features (N', F), dense head weight (C, F);
    * QPM model: maps of the n_f selected features (N, n_f, h, w), features = their raw pooled values (N', n_f), as
      the reference feeds them (not the head's (f − μ)/σ, which changes the uncentred correlation), binary weight
      (C, n_f). The reference's GradCAM uses W itself; pass W / σ instead for a GradCAM that
      decomposes the logit exactly (SID@k is unaffected for rows with exactly k positive weights).

    Args:
        logits: shape (N, C).
        labels: true classes of the logits' images, shape (N,).
        maps: feature maps of the same images, shape (N, F, h, w).
        features: pooled features, shape (N', F).
        head_weight: shape (C, F), binary sparse or dense.
        masks: optional object masks on the maps' grid, shape (N, h, w); enables the plausibility keys.
        k: SID@k's k; the key is `sid_at_{k}`.
        seed: seed of the contrastiveness EM restarts (the default single start is deterministic anyway).
        feature_labels: true classes of `features`' rows, shape (N',); defaults to `labels`.
        class_attributes: optional per-class attribute vectors (C, A); enables `structural_grounding`.
        feature_metrics: `feature_part` of an earlier call's output on the same `features`, `head_weight`,
            `feature_labels` and `seed`: its values are reused, not recomputed (the evaluation scores validation and
            test against the same train features; contrastiveness's EM over Fashion-MNIST's 54k fit rows costs
            about 7 s per 64 columns even when it converges fast).

    Returns:
        Floats (and the list `per_class_accuracy`, null for classes without samples); a metric whose value is
        undefined (e.g. SID@k when no predicted class has k nonzero weights) is left out. A metric that raises
        `MetricUndefined` on this data is left out too, with its reason under "undefined" ({key: reason}); any
        other error propagates (a bug, or inputs that do not fit together).
    """
    pred = predictions_from_logits(logits)
    y = as_labels(labels, n=pred.shape[0])
    w = as_float(head_weight, name="head_weight", ndim=2)
    n_classes = int(np.shape(logits)[1])
    if w.shape[0] != n_classes:
        raise ValueError(f"head_weight has {w.shape[0]} rows but logits have {n_classes} classes")
    m = as_maps(maps, n_features=w.shape[1])
    if m.shape[0] != pred.shape[0]:
        raise ValueError(f"{m.shape[0]} maps for {pred.shape[0]} logits")
    f = as_float(features, name="features", ndim=2)
    if f.shape[1] != w.shape[1]:
        raise ValueError(f"features have {f.shape[1]} columns but the head weight has {w.shape[1]}")
    f_labels = y if feature_labels is None else as_labels(feature_labels, name="feature_labels")
    if f_labels.shape[0] != f.shape[0]:
        raise ValueError(f"{f.shape[0]} feature rows but {f_labels.shape[0]} labels (pass feature_labels)")

    out: dict[str, Any] = {
        "accuracy": accuracy(logits, y),
        "per_class_accuracy": [_finite_or_none(a) for a in per_class_accuracy(logits, y, n_classes=n_classes)],
    }
    undefined: dict[str, str] = {}

    def measure(key: str, fn: Callable[[], Any]) -> None:
        try:
            value = fn()
        except MetricUndefined as e:  # the data allow no value: n/a with its reason, never a stopped run
            undefined[key] = str(e)
            return
        if not (isinstance(value, float) and math.isnan(value)):
            out[key] = value

    measure(f"sid_at_{k}", lambda: sid_at_k(m, w, pred, k=k))
    used = f[:, relevant_features(w)]
    if feature_metrics is not None:
        out.update({key: value for key, value in feature_metrics.items() if key != "undefined"})
        undefined.update(feature_metrics.get("undefined", {}))
    else:
        if used.shape[1] >= 1:
            measure("class_independence", lambda: class_independence(used, f_labels, n_classes=n_classes))
            if used.shape[0] >= 2:
                measure("contrastiveness", lambda: contrastiveness(used, seed=seed))
        if used.shape[1] >= 2:
            measure("correlation", lambda: correlation(used))

    if masks is not None:
        overlaps = segmentation_overlaps(m, w, pred, masks)
        out["plausibility"] = overlaps["plausibility_gradcam_dilated"]
        out.update(overlaps)
    if class_attributes is not None:
        measure("structural_grounding", lambda: structural_grounding(w[:, relevant_features(w)],
                                                                     class_attributes=class_attributes))
    if undefined:
        out["undefined"] = undefined
    return out
