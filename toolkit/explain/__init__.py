"""Explanations people can look at, rendered from the model methods that make the prediction.

`views`: JSON-able dataclasses and their builders (`explain_tokens` -> `LocalExplanation`, `global_explanation`,
`contrast_explanation`); `render`: PNGs of each view; `atlas`: the feature atlas (each feature's strongest training
images with its map, its classes, its activation per class); `report`: every view of a run into explanations/ and
report.md; `html`: the self-contained report.html; `cli`: `python -m toolkit.explain --run RUN_DIR --images PATH...
[--out DIR]`, which also adds the views to the run's report.html.
"""

from toolkit.explain.render import (
    contrast_figure_px,
    global_figure_px,
    local_figure_px,
    render_contrast,
    render_global,
    render_local,
)
from toolkit.explain.views import (
    ContrastExample,
    ContrastExplanation,
    FeatureContribution,
    GlobalExplanation,
    LocalExplanation,
    check_additivity,
    contrast_explanation,
    explain_tokens,
    global_explanation,
    pick_pair,
    seriate,
    shared_pairs,
)

__all__ = [
    "ContrastExample",
    "ContrastExplanation",
    "FeatureContribution",
    "GlobalExplanation",
    "LocalExplanation",
    "check_additivity",
    "contrast_explanation",
    "contrast_figure_px",
    "explain_tokens",
    "global_explanation",
    "global_figure_px",
    "local_figure_px",
    "pick_pair",
    "render_contrast",
    "render_global",
    "render_local",
    "seriate",
    "shared_pairs",
]
