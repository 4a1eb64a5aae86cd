"""The three explanation views of a DINO-QPM model as JSON-able dataclasses: local, global and contrast.

Everything comes from the model surface that predicts (`DinoQPM.forward` -> logits, pooled features, maps, and
`SparseHead.contributions`), never from a separate attribution method. With average pooling and the binary head,
logit_c = Σ_j W_cj (mean_p M_j(p) − μ_j) / σ_j, so the m maps of the predicted class are the explanation and their
contributions add up to the logit exactly; `explain_tokens` checks that for every image it explains.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.cluster import hierarchy
from torch import Tensor

from toolkit.model import DinoQPM, SparseHead

# |Σ contributions − logit| must stay below this times (1 + Σ|contributions|): float32 sums in a different order.
ADDITIVITY_RTOL = 1e-5


@dataclass(frozen=True)
class FeatureContribution:
    """One feature's part in a logit: contribution = weight * (activation − mean) / std.

    Attributes:
        feature: column j of the head's W (0 .. k−1).
        channel: the adapter channel behind column j (the head's selection).
        activation: pooled feature f_j, the mean of its map.
        mean, std: the frozen standardisation μ_j and max(σ_j, 1e-6).
        weight: W_cj (1 for a used feature of a binary head).
        contribution: the term this feature adds to the class logit.
    """

    feature: int
    channel: int
    activation: float
    mean: float
    std: float
    weight: float
    contribution: float


@dataclass(frozen=True)
class LocalExplanation:
    """Why one image gets its predicted class: the class's m features, their contributions and their maps.

    Attributes:
        image: path or sample id of the image.
        predicted, predicted_name: ĉ and its class name.
        logit: the logit of ĉ; equals the sum of `features[*].contribution` (the head has no bias).
        probability: softmax probability of ĉ.
        runner_up, runner_up_name, runner_up_logit: the second-highest class (None with one class).
        label, label_name: the true class when known.
        features: the m features of ĉ, largest contribution first.
        maps: raw adapter maps of `features` in the same order, shape (m, h, w) as nested lists.
    """

    image: str
    predicted: int
    predicted_name: str
    logit: float
    probability: float
    runner_up: int | None
    runner_up_name: str | None
    runner_up_logit: float | None
    label: int | None
    label_name: str | None
    features: list[FeatureContribution]
    maps: list[list[list[float]]]

    @property
    def contribution_sum(self) -> float:
        return float(sum(f.contribution for f in self.features))

    def to_dict(self, *, maps: bool = True) -> dict[str, Any]:
        """JSON-able dict; `maps=False` leaves the (m, h, w) maps out (e.g. for a predictions file)."""
        d = asdict(self)
        if not maps:
            d.pop("maps")
        return d


def check_additivity(contributions: Tensor, logit: Tensor, *, what: str) -> None:
    """Raises AssertionError unless the contributions (m,) add up to the logit (a scalar)."""
    total = float(contributions.double().sum())
    tol = ADDITIVITY_RTOL * (1.0 + float(contributions.double().abs().sum()))
    if abs(total - float(logit)) > tol:
        raise AssertionError(f"{what}: contributions sum to {total:.6g} but the logit is {float(logit):.6g}; the "
                             "explanation would not be faithful")


@torch.no_grad()
def explain_tokens(model: DinoQPM, tokens: Tensor, *, classes: Sequence[str], images: Sequence[str],
                   labels: Sequence[int] | None = None) -> list[LocalExplanation]:
    """Local explanations of a batch, from one forward pass of the model that predicts.

    Args:
        model: a DINO-QPM model with a `SparseHead` (put in eval mode here).
        tokens: backbone tokens, shape (B, P + 1, D) (`join_tokens(patch, cls)`).
        classes: class names, index = label.
        images: a path or id per image, length B.
        labels: true classes, length B, if known.

    Returns:
        One `LocalExplanation` per image.

    Raises:
        ValueError: the head is not sparse, or the lengths disagree.
        AssertionError: contributions do not add up to the logit (should never happen).
    """
    if not isinstance(model.head, SparseHead):
        raise ValueError("local explanations need the DINO-QPM model with its sparse head (RUN_DIR/checkpoint), "
                         "not the dense model")
    if len(images) != tokens.shape[0] or (labels is not None and len(labels) != tokens.shape[0]):
        raise ValueError(f"{tokens.shape[0]} token rows but {len(images)} image names"
                         + ("" if labels is None else f" and {len(labels)} labels"))
    model.eval()
    head = model.head
    logits, features, maps = model(tokens.to(head.weight.device))
    contributions = head.contributions(features)  # (B, C, k): the same function that made the logits
    probs = logits.float().softmax(dim=-1)
    std = head.std.clamp_min(1e-6)
    out = []
    for b in range(tokens.shape[0]):
        order = torch.argsort(logits[b], descending=True, stable=True)
        c = int(order[0])
        cols = torch.nonzero(head.weight[c], as_tuple=False).flatten()
        contrib = contributions[b, c, cols]
        check_additivity(contrib, logits[b, c], what=f"image {images[b]!r}, class {classes[c]!r}")
        cols = cols[torch.argsort(contrib, descending=True, stable=True)]
        feats = [FeatureContribution(feature=int(j), channel=int(head.selection[j]),
                                     activation=float(features[b, j]), mean=float(head.mean[j]),
                                     std=float(std[j]), weight=float(head.weight[c, j]),
                                     contribution=float(contributions[b, c, j])) for j in cols]
        second = int(order[1]) if len(order) > 1 else None
        label = None if labels is None else int(labels[b])
        out.append(LocalExplanation(
            image=str(images[b]), predicted=c, predicted_name=classes[c], logit=float(logits[b, c]),
            probability=float(probs[b, c]), runner_up=second,
            runner_up_name=None if second is None else classes[second],
            runner_up_logit=None if second is None else float(logits[b, second]),
            label=label, label_name=None if label is None else classes[label], features=feats,
            maps=maps[b, cols].float().cpu().numpy().tolist()))
    return out


def _binary(weight: Any) -> np.ndarray:
    w = np.asarray(weight.detach().cpu() if hasattr(weight, "detach") else weight)
    if w.ndim != 2 or not np.isin(w, (0, 1)).all():
        raise ValueError(f"expected a binary class x feature matrix (C, k), got shape {w.shape}")
    return w.astype(bool)


def shared_pairs(weight: Any) -> list[tuple[int, int, int]]:
    """All class pairs (a < b) with the number of features they share, most shared first (then by a, b).

    Args:
        weight: binary W, shape (C, k).
    """
    w = _binary(weight).astype(np.int64)
    overlap = w @ w.T
    pairs = [(a, b, int(overlap[a, b])) for a, b in itertools.combinations(range(w.shape[0]), 2)]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))


def seriate(weight: Any) -> tuple[list[int], list[int]]:
    """Row and column orders that make shared structure visible in a binary matrix.

    Classes: leaf order of an average-linkage clustering on the Jaccard distance of their feature sets, with
    optimal leaf ordering, so classes that share features sit next to each other. Features: grouped by the first
    class (in that order) that uses them, the most widely used first inside a group; unused features last.

    Args:
        weight: binary W, shape (C, k).

    Returns:
        (class order, feature order), permutations of range(C) and range(k).
    """
    w = _binary(weight)
    n_classes, k = w.shape
    if n_classes > 2 and w.any(axis=1).all():
        tree = hierarchy.linkage(w, method="average", metric="jaccard", optimal_ordering=True)
        rows = [int(i) for i in hierarchy.leaves_list(tree)]
    else:
        rows = list(range(n_classes))
    position = {c: i for i, c in enumerate(rows)}
    degree = w.sum(axis=0)

    def key(j: int) -> tuple[int, int, int]:
        users = np.flatnonzero(w[:, j])
        return (min(position[int(c)] for c in users) if users.size else n_classes, -int(degree[j]), j)

    return rows, sorted(range(k), key=key)


@dataclass(frozen=True)
class GlobalExplanation:
    """The whole model at a glance: which class uses which of the k features.

    Attributes:
        classes: class names, index = row of `weight`.
        selection: adapter channel of each column j.
        weight: binary W, shape (C, k), in the head's order.
        class_order, feature_order: the seriated display order (`seriate`).
        n_per_class: m, the ones per row.
    """

    classes: list[str]
    selection: list[int]
    weight: list[list[int]]
    class_order: list[int]
    feature_order: list[int]
    n_per_class: int

    @property
    def n_used(self) -> int:
        """Features that at least one class uses (columns of W that are not all zero)."""
        return int(sum(d > 0 for d in self.degree))

    @property
    def degree(self) -> list[int]:
        """How many classes use each feature, shape (k,)."""
        return np.asarray(self.weight).sum(axis=0).astype(int).tolist()

    def assignment(self) -> dict[str, list[int]]:
        """Class name -> the columns j it uses."""
        return {name: [j for j, v in enumerate(row) if v] for name, row in zip(self.classes, self.weight)}

    def to_dict(self, *, top_pairs: int = 20) -> dict[str, Any]:
        """JSON-able dict with the matrix, the display order, feature degrees and the most-sharing class pairs."""
        pairs = [{"classes": [self.classes[a], self.classes[b]], "indices": [a, b], "shared": n}
                 for a, b, n in shared_pairs(self.weight)[:top_pairs]]
        return {**asdict(self), "degree": self.degree, "n_used": self.n_used, "assignment": self.assignment(),
                "shared_pairs": pairs}


def global_explanation(weight: Any, classes: Sequence[str], selection: Sequence[int] | None = None
                       ) -> GlobalExplanation:
    """The global view of a binary head.

    Args:
        weight: binary W, shape (C, k), the same number m of ones in every row.
        classes: C class names.
        selection: adapter channel per column (default: 0 .. k−1).
    """
    w = _binary(weight)
    if len(classes) != w.shape[0]:
        raise ValueError(f"{len(classes)} class names for {w.shape[0]} rows of W")
    m = w.sum(axis=1)
    if (m != m[0]).any():
        raise ValueError(f"every class must use the same number of features, got row sums {sorted(set(m.tolist()))}")
    rows, cols = seriate(w)
    sel = list(range(w.shape[1])) if selection is None else [int(s) for s in selection]
    return GlobalExplanation(classes=list(classes), selection=sel, weight=w.astype(int).tolist(), class_order=rows,
                             feature_order=cols, n_per_class=int(m[0]))


@dataclass(frozen=True)
class ContrastExample:
    """Feature j on the image of class `class_index` where it is strongest (or sample −1 if the class has none)."""

    feature: int
    class_index: int
    sample: int
    image: str
    activation: float
    map: list[list[float]]


@dataclass(frozen=True)
class ContrastExplanation:
    """Two classes side by side: the features they share and the ones that tell them apart.

    Attributes:
        class_a, class_b, name_a, name_b: the two classes.
        reason: why this pair was shown.
        shared: columns used by both; only_a, only_b: columns used by one of them only.
        examples: for every column of `columns` and each of the two classes, that class's example (may be empty).
    """

    class_a: int
    class_b: int
    name_a: str
    name_b: str
    reason: str
    shared: list[int]
    only_a: list[int]
    only_b: list[int]
    examples: list[ContrastExample]

    @property
    def columns(self) -> list[int]:
        """Display order: a's own features, the shared ones, b's own features."""
        return [*self.only_a, *self.shared, *self.only_b]

    def example(self, feature: int, class_index: int) -> ContrastExample | None:
        return next((e for e in self.examples if e.feature == feature and e.class_index == class_index), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_pair(weight: Any, confusion: Any = None) -> tuple[int, int, str]:
    """The default pair to contrast: the most shared features, ties broken by the confusion between the two.

    Args:
        weight: binary W, shape (C ≥ 2, k).
        confusion: optional (C, C) counts, rows = true class, columns = predicted class.

    Returns:
        (a, b, reason) with a < b.
    """
    pairs = shared_pairs(weight)
    if not pairs:
        raise ValueError("a contrast needs at least two classes")
    conf = None if confusion is None else np.asarray(confusion)
    best = max(pairs, key=lambda p: (p[2], 0 if conf is None else int(conf[p[0], p[1]] + conf[p[1], p[0]]),
                                     -p[0], -p[1]))
    a, b, n = best
    reason = f"the pair sharing the most features ({n} of {int(_binary(weight)[a].sum())})"
    if conf is not None:
        reason += f"; {int(conf[a, b] + conf[b, a])} test images confused between them"
    return a, b, reason


def contrast_explanation(weight: Any, classes: Sequence[str], *, a: int | None = None, b: int | None = None,
                         confusion: Any = None, features: Any = None, labels: Any = None,
                         maps_of: Callable[[Sequence[int]], np.ndarray] | None = None,
                         ids: Sequence[str] | None = None) -> ContrastExplanation:
    """Compares two classes; with `features`, `labels` and `maps_of` it also picks example images.

    For every shown feature j and each class c of the pair the example is the image of class c with the highest
    pooled activation f_j, so a distinguishing feature is seen where it is strongest in its own class and at its
    best in the other class.

    Args:
        weight: binary W, shape (C, k).
        classes: class names.
        a, b: the classes to compare; default `pick_pair(weight, confusion)`.
        confusion: optional (C, C) confusion counts for the default pair.
        features: pooled features of the example pool (e.g. the test split), shape (N, k).
        labels: their true classes, shape (N,).
        maps_of: sample indices -> their maps, shape (n, k, h, w).
        ids: a name per sample (default: the index).
    """
    w = _binary(weight)
    if a is None or b is None:
        a, b, reason = pick_pair(w, confusion)
    else:
        if a == b or not (0 <= a < w.shape[0] and 0 <= b < w.shape[0]):
            raise ValueError(f"need two different classes in 0..{w.shape[0] - 1}, got {a} and {b}")
        reason = "requested"
    shared = np.flatnonzero(w[a] & w[b]).tolist()
    only_a = np.flatnonzero(w[a] & ~w[b]).tolist()
    only_b = np.flatnonzero(w[b] & ~w[a]).tolist()
    examples: list[ContrastExample] = []
    if features is not None and labels is not None and maps_of is not None:
        f, y = np.asarray(features), np.asarray(labels)
        picks = []  # (feature, class, sample)
        for j in [*only_a, *shared, *only_b]:
            for c in (a, b):
                pool = np.flatnonzero(y == c)
                if pool.size:
                    picks.append((j, c, int(pool[np.argmax(f[pool, j])])))
        samples = sorted({s for _, _, s in picks})
        maps = dict(zip(samples, maps_of(samples))) if samples else {}
        for j, c, s in picks:
            examples.append(ContrastExample(feature=j, class_index=c, sample=s,
                                            image=str(ids[s]) if ids is not None else str(s),
                                            activation=float(f[s, j]), map=np.asarray(maps[s][j]).tolist()))
    return ContrastExplanation(class_a=a, class_b=b, name_a=classes[a], name_b=classes[b], reason=reason,
                               shared=shared, only_a=only_a, only_b=only_b, examples=examples)
