"""How far the QP's certificates can go on dense penalty graphs: `solve_qp`'s answer and bound beside the floor of
its subset bound, and what one level of branching on s gains.

The floor is `joint_bound` (joint_bound.py beside this script): the lifted relaxation with the class part kept
instead of priced. At any class prices the subset bound's SDP phase is at least this value, so no amount of price
steps goes below it; a lower certificate needs a stronger relaxation or branching. Branching here fixes the
relaxation's most fractional feature out and in and solves both children: the larger child is the best bound that
level can prove.

    python benchmarks/qp_research/qp_floor.py                          # CUB size, q95 clique q85: about 30 minutes
    python benchmarks/qp_research/qp_floor.py --rules q95 --no-branch  # the root floor only

Each relaxation solve takes 1.5-3 minutes at CUB size on 2 cores (SCS, tolerance 1e-4; the value is certified from
the duals, so a looser solve only gives a higher floor).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from toolkit.qp.problem import build_problem
from toolkit.qp.sdp_bound import TIGHT_EPS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/qp.py: the same instances and solve_qp call
from joint_bound import joint_bound  # noqa: E402 (this folder, on the path as the script's own)
from qp import instance, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", nargs="+", default=["q95", "clique", "q85"], choices=["q95", "clique", "q85"])
    ap.add_argument("--time-limit", type=float, default=60.0, help="solve_qp's budget per rule (seconds)")
    ap.add_argument("--sdp-limit", type=float, default=600.0, help="SCS's limit per relaxation solve (seconds)")
    ap.add_argument("--no-branch", action="store_true", help="skip the one level of branching")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    A, R = instance("cub", args.seed)
    rows = []
    for rule in args.rules:
        r = run("cub", A, R, rule, args.time_limit, "highs")
        problem = build_problem(A, R, k=50, m=5, tau=r["tau"], w=1.0)
        root = joint_bound(problem, eps=TIGHT_EPS, time_limit=args.sdp_limit)
        frac = (root.s > 1e-2) & (root.s < 1 - 1e-2)
        row = {**r, "floor": root.value, "floor_gap_pct": 100 * (root.value - r["objective"]) / r["objective"],
               "floor_seconds": root.seconds, "floor_status": root.status, "fractional": int(frac.sum()),
               "largest_s": float(root.s.max())}
        print(f"{rule:7s} floor {root.value:.3f} ({row['floor_gap_pct']:.3f} % above the answer, {root.seconds:.0f} s, "
              f"{root.status}); {row['fractional']} fractional features, largest s {row['largest_s']:.3f}", flush=True)
        if not args.no_branch:
            f = int(np.argmin(np.abs(root.s - 0.5)))  # the most fractional feature
            kids = [joint_bound(problem, fixed={f: v}, eps=TIGHT_EPS, time_limit=args.sdp_limit) for v in (0, 1)]
            best = max(kid.value for kid in kids)
            row.update(branch_feature=f, branch_s=float(root.s[f]), child_out=kids[0].value, child_in=kids[1].value,
                       branch_gain=root.value - best)
            print(f"{rule:7s} branch on feature {f} (s = {root.s[f]:.3f}): out {kids[0].value:.3f}, "
                  f"in {kids[1].value:.3f}, the level proves {best:.3f} ({root.value - best:.3f} below the floor)",
                  flush=True)
        rows.append(row)
    print("\n| rule | pairs (%) | objective | bound (s) | gap | floor | floor gap | fractional | branch: out / in "
          "| gain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        branch = (f"{r['child_out']:.3f} / {r['child_in']:.3f} | {r['branch_gain']:.3f}" if "branch_gain" in r
                  else "- | -")
        print(f"| {r['rule']} | {r['pairs']:,} ({r['pairs_pct']:.1f}) | {r['objective']:.3f} | {r['bound']:.3f} "
              f"({r['seconds']:.0f}) | {r['gap_pct']:.3f} % | {r['floor']:.3f} | {r['floor_gap_pct']:.3f} % "
              f"| {r['fractional']} | {branch} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
