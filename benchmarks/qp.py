"""Benchmark of the QPM selection (toolkit.qp) on simulated CUB-size and ImageNet-size instances, or on A and R from
a real run (`--inputs`).

Instances follow the prototype benchmark's recipe (docs/method.md#qp): 30 images per class; a 64-d latent space with
C/10 superclasses (class prototype 0.8 * superclass centre + 0.6 * noise, per-image noise 0.9); pooled non-negative
features ReLU(W z + 0.5 eps - 0.4) whose rows W come from F/8 shared feature families (0.75 family + 0.66 own), so
groups of features are redundant; about 60 % of activations are 0. A and R are then computed exactly as in the
pipeline (toolkit.qp.inputs).

Redundancy thresholds ("rules"):
* "clique": tau = None with qp.redundancy_rule = "clique" (the lowest tau at which k pairwise-compatible features
  exist), which penalises ~10 % of all pairs on these instances;
* "reference": qp.redundancy_rule = "reference" (the toolkit default), as the DINO-QPM code: twice the clique tau
  (it finds tau on R + R^T but compares R; docs/method.md, differences from the reference code), penalty min-max
  rescaled over R's nonzeros;
* "dino": the same tau with the toolkit's penalty w R;
* "q99": tau = the 99th percentile of R (~1 % of pairs), the setting of the prototype benchmark;
* "q95", "q85": fixed thresholds passed as numbers, penalising 5 % and 15 % of the pairs.

Each row is one `solve_qp` call and prints objective, bound, gap, seconds, penalised pairs and which component
produced the bound and the answer. The default run is every rule at CUB size (60 s each) plus one ImageNet-size row
(q99, 600 s):

    python benchmarks/qp.py
    python benchmarks/qp.py --sizes cub --rules clique q85            # a subset
    python benchmarks/qp.py --inputs run/qp_inputs.npz --rules clique q99 --time-limit 60
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from toolkit.config import QPConfig
from toolkit.qp import choose_tau, solve_qp
from toolkit.qp.inputs import correlation_A, load_inputs, similarity_R

RULES = ("clique", "reference", "dino", "q99", "q95", "q85")

SIZES = {"cub": (512, 200), "imagenet": (2048, 1000)}  # (F, C); k = 50, m = 5 for both


def simulate(n_features: int, n_classes: int, *, seed: int = 0, per_class: int = 30,
             latent: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (N, F) float32 and labels (N,) with shared class and feature structure."""
    rng = np.random.default_rng(seed)
    n_super = max(1, n_classes // 10)
    centres = rng.standard_normal((n_super, latent))
    proto = 0.8 * centres[rng.integers(0, n_super, n_classes)] + 0.6 * rng.standard_normal((n_classes, latent))
    families = rng.standard_normal((max(1, n_features // 8), latent))
    w = (0.75 * families[rng.integers(0, len(families), n_features)]
         + 0.66 * rng.standard_normal((n_features, latent))) / np.sqrt(latent)
    labels = np.repeat(np.arange(n_classes), per_class)
    z = proto[labels] + 0.9 * rng.standard_normal((len(labels), latent))
    pre = (z @ w.T).astype(np.float32) + 0.5 * rng.standard_normal((len(labels), n_features), dtype=np.float32)
    return np.maximum(pre - 0.4, 0.0), labels


def instance(size: str, seed: int = 0, keep_negative: bool = False) -> tuple[np.ndarray, np.ndarray]:
    n_features, n_classes = SIZES[size]
    feats, labels = simulate(n_features, n_classes, seed=seed)
    A = correlation_A(feats, labels, n_classes)
    return A, similarity_R(A, keep_negative=keep_negative)


def tau_for(rule: str, R: np.ndarray, k: int) -> float | None:
    """The threshold of a rule (None: found inside solve_qp by qp.redundancy_rule)."""
    if rule in ("clique", "reference"):
        return None
    if rule == "dino":
        return 2.0 * choose_tau(R, k).tau
    upper = R[np.triu_indices(len(R), 1)]
    return float(np.quantile(upper, {"q99": 0.99, "q95": 0.95, "q85": 0.85}[rule]))


def rule_R(A: np.ndarray, R: np.ndarray, rule: str, *, simulated: bool) -> np.ndarray:
    """R as a rule reads it: the reference rule keeps negative cosines, the others set them to 0. Simulated
    instances come with R >= 0 (`instance`); a real run stores R as its rule made it (negatives kept by the default
    reference rule)."""
    if rule == "reference" and simulated:
        return similarity_R(A, keep_negative=True)
    if rule != "reference" and not simulated:
        return np.maximum(R, 0.0)
    return R


def real_instance(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A and R of a real run's inputs.npz (R = cosine of A's rows with negatives kept when the file has none)."""
    A, R = load_inputs(path)
    return A, similarity_R(A, keep_negative=True) if R is None else R


def config_for(rule: str, R: np.ndarray, time_limit: float, method: str, *, k: int = 50, m: int = 5,
               mip_gap: float | None = None) -> QPConfig:
    """The solve_qp configuration of a rule (R already as the rule reads it, `rule_R`)."""
    extra = {} if mip_gap is None else {"mip_gap": mip_gap}
    return QPConfig(n_features=k, n_per_class=m, redundancy_threshold=tau_for(rule, R, k), solver=method,
                    time_limit=time_limit, redundancy_rule="reference" if rule == "reference" else "clique", **extra)


def run(name: str, A: np.ndarray, R: np.ndarray, rule: str, time_limit: float, method: str) -> dict:
    cfg = config_for(rule, R, time_limit, method)
    sel = solve_qp(A, R, cfg, log=lambda line: print(f"  [{time.strftime('%X')}] {line}", flush=True))
    used = len({f for fs in sel.assignment for f in fs})
    r = {"instance": name, "F": A.shape[0], "C": A.shape[1], "rule": rule, "tau": sel.tau,
         "pairs": sel.stats["n_pairs"], "pairs_pct": 100 * sel.stats["pairs_share"], "method": method,
         "objective": sel.objective, "bound": sel.bound, "gap_pct": 100 * sel.gap, "seconds": sel.seconds,
         "time_limit": time_limit, "status": sel.status, "bound_source": sel.stats["bound_source"],
         "answer_source": sel.stats["answer_source"], "features_used": used,
         "heuristic_objective": sel.stats["heuristic_objective"], "lp_bound": sel.stats["lagrangian_bound"],
         "subset_bound": sel.stats.get("subset_bound"), "milp_bound": sel.stats.get("milp_bound")}
    print(f"{name:10s} {rule:7s} {method:9s} objective {r['objective']:.4f}  bound {r['bound']:.4f}  "
          f"gap {r['gap_pct']:.3f}%  {r['seconds']:.1f}s  {r['status']}  (bound: {r['bound_source']}, "
          f"answer: {r['answer_source']})", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="*", default=None, choices=sorted(SIZES),
                    help="simulated sizes (default: every rule at cub, q99 at imagenet)")
    ap.add_argument("--rules", nargs="+", default=None, choices=RULES)
    ap.add_argument("--inputs", type=Path, nargs="*", default=[], help=".npz files with A (and R) from real runs")
    ap.add_argument("--methods", nargs="+", default=["highs"], help="solvers (highs, heuristic, scip, ...)")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds (default 60; 600 at ImageNet size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    jobs: list[tuple[str, str]] = []  # (instance, rule)
    if args.sizes is None and not args.inputs:
        jobs = [("cub", rule) for rule in (args.rules or RULES)] + [("imagenet", "q99")]
    for size in args.sizes or []:
        jobs += [(size, rule) for rule in (args.rules or RULES)]
    for path in args.inputs:
        jobs += [(str(path), rule) for rule in (args.rules or RULES)]
    rows, cache = [], {}
    for name, rule in jobs:
        if name not in cache:
            cache[name] = instance(name, args.seed) if name in SIZES else real_instance(Path(name))
        A, R = cache[name]
        R = rule_R(A, R, rule, simulated=name in SIZES)
        limit = args.time_limit or (600.0 if name == "imagenet" else 60.0)
        for method in args.methods:
            rows.append(run(name, A, R, rule, limit, method))
    print("\n| instance | rule | tau | pairs (%) | method | objective | bound | gap % | seconds (limit) | status "
          "| bound from | answer from |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['instance']} ({r['F']}x{r['C']}) | {r['rule']} | {r['tau']:.4f} | {r['pairs']:,} "
              f"({r['pairs_pct']:.1f}) | {r['method']} | {r['objective']:.3f} | {r['bound']:.3f} | {r['gap_pct']:.3f} "
              f"| {r['seconds']:.1f} ({r['time_limit']:g}) | {r['status']} | {r['bound_source']} "
              f"| {r['answer_source']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
