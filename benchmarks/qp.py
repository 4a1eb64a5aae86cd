"""Benchmark of the QPM selection (toolkit.qp) on simulated CUB-size and ImageNet-size instances.

Instances follow qpbench.md ("Instances"): 30 images per class; a 64-d latent space with C/10 superclasses (class
prototype 0.8 * superclass centre + 0.6 * noise, per-image noise 0.9); pooled non-negative features
ReLU(W z + 0.5 eps - 0.4) whose rows W come from F/8 shared feature families (0.75 family + 0.66 own), so groups
of features are redundant; about 60 % of activations are 0. A and R are then computed exactly as in the pipeline
(toolkit.qp.inputs).

Three redundancy thresholds:
* "reference": tau = None, the clique rule the toolkit uses by default (qpm.md §3.3), which penalises ~10 % of
  all pairs on these instances;
* "dino": twice that tau, which is what the DINO-QPM code effectively penalises (it finds tau on R + R^T but
  compares R, dino_qpm.md §3.4);
* "q99": tau = the 99th percentile of R, the setting of the qpbench.md prototype (~1 % of pairs);
* "reference_rule": `qp.redundancy_rule=reference`, the DINO-QPM code's rule itself (tau searched on R + R^T,
  compared with R, negative cosines kept, penalty min-max rescaled); the three above use `single_scale`.

For each, the heuristic (solver="heuristic": greedy + local search + distinct assignment, certified by the
Lagrangian bound) and the full pipeline with the MILP (solver="highs") print objective, bound, gap and seconds.

    python benchmarks/qp.py                       # CUB size, all three thresholds, 60 s limit
    python benchmarks/qp.py --sizes imagenet --time-limit 600
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.config import QPConfig  # noqa: E402
from toolkit.qp import choose_tau, solve_qp  # noqa: E402
from toolkit.qp.inputs import correlation_A, similarity_R  # noqa: E402

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


def run(size: str, rule: str, time_limit: float, seed: int, methods: list[str]) -> list[dict]:
    t = time.perf_counter()
    A, R = instance(size, seed, keep_negative=rule == "reference_rule")
    build = time.perf_counter() - t
    if rule in ("reference", "reference_rule"):
        tau = None
    elif rule == "dino":
        tau = 2.0 * choose_tau(R, 50).tau
    else:
        tau = float(np.quantile(R[np.triu_indices(len(R), 1)], 0.99))
    rows = []
    for method in methods:
        cfg = QPConfig(n_features=50, n_per_class=5, redundancy_threshold=tau, solver=method,
                       time_limit=time_limit,
                       redundancy_rule="reference" if rule == "reference_rule" else "single_scale")
        sel = solve_qp(A, R, cfg, log=lambda line: print(f"  [{time.strftime('%X')}] {line}", flush=True))
        rows.append({"size": size, "F": A.shape[0], "C": A.shape[1], "tau_rule": rule, "tau": sel.tau,
                     "pairs": sel.stats["n_pairs"], "method": method, "objective": sel.objective, "bound": sel.bound,
                     "gap_pct": 100 * sel.gap, "seconds": sel.seconds, "status": sel.status,
                     "lazy_rounds": sel.lazy_rounds, "heuristic_objective": sel.stats["heuristic_objective"],
                     "heuristic_seconds": sel.stats["heuristic_seconds"],
                     "lagrangian_bound": sel.stats["lagrangian_bound"], "milp_bound": sel.stats.get("milp_bound"),
                     "answer_source": sel.stats["answer_source"], "instance_seconds": build})
        r = rows[-1]
        print(f"{size:8s} tau={rule:9s} {method:9s} objective {r['objective']:.4f}  bound {r['bound']:.4f}  "
              f"gap {r['gap_pct']:.3f}%  {r['seconds']:.1f}s  {r['status']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["cub"], choices=sorted(SIZES))
    ap.add_argument("--tau", nargs="+", default=["reference", "dino", "q99"],
                    choices=["reference", "dino", "q99", "reference_rule"])
    ap.add_argument("--methods", nargs="+", default=["heuristic", "highs"])
    ap.add_argument("--time-limit", type=float, default=None, help="seconds (default 60 CUB, 600 ImageNet)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        limit = args.time_limit or (60.0 if size == "cub" else 600.0)
        for rule in args.tau:
            rows += run(size, rule, limit, args.seed, args.methods)
    print("\n| size | tau rule | tau | penalised pairs | method | objective | bound | gap % | seconds | status |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} ({r['F']}x{r['C']}) | {r['tau_rule']} | {r['tau']:.4f} | {r['pairs']} | {r['method']} "
              f"| {r['objective']:.3f} | {r['bound']:.3f} | {r['gap_pct']:.3f} | {r['seconds']:.1f} | {r['status']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
