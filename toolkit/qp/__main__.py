"""Command line: solve the QPM selection for an inputs file and write the answer with its certificate.

    python -m toolkit.qp --inputs X.npz --n-features K --n-per-class M [--redundancy-threshold T]
        [--redundancy-rule clique|reference] [--redundancy-weight W] [--time-limit S]
        [--solver auto|highs|scip|gurobi|heuristic] --out Y.json

X.npz holds `A` (F, C) and optionally `R` (F, F) (cosine of A's rows when absent). Y.json holds selected,
assignment, objective, bound, gap, status, seconds, solver, solver_version, tau, lazy_rounds, input_sha256 and stats
(answer_source and bound_source: which component produced each). status: optimal (gap zero), within_gap (gap at
most --mip-gap), time_limit (stopped above it), heuristic (--solver heuristic, gap above --mip-gap).

Exit codes: 0 solved; 2 bad arguments or inputs (the message names the problem and the fix), or --out exists
without --force; 3 the requested solver is unavailable; 4 an answer failed verification (a bug, please report).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from toolkit.config import ConfigError, QPConfig
from toolkit.files import atomic_write_text
from toolkit.qp._checks import QPInputError, QPSolverError, QPVerificationError
from toolkit.qp.inputs import load_inputs
from toolkit.qp.solve import solve_qp

_FLAGS = {"n_features": "--n-features", "n_per_class": "--n-per-class", "redundancy_weight": "--redundancy-weight",
          "redundancy_threshold": "--redundancy-threshold", "redundancy_rule": "--redundancy-rule",
          "time_limit": "--time-limit", "mip_gap": "--mip-gap"}


def _parser() -> argparse.ArgumentParser:
    defaults = QPConfig()  # pydantic fields are not class attributes: read the defaults from an instance
    ap = argparse.ArgumentParser(prog="python -m toolkit.qp", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", required=True, type=Path, help=".npz with A (F, C) and optionally R (F, F)")
    ap.add_argument("--n-features", required=True, type=int, metavar="K", help="k: features selected globally")
    ap.add_argument("--n-per-class", required=True, type=int, metavar="M", help="m: features per class")
    ap.add_argument("--redundancy-threshold", type=float, default=None, metavar="T",
                    help="tau; default: lowest threshold with K pairwise-compatible features")
    ap.add_argument("--redundancy-rule", choices=("clique", "reference"), default=defaults.redundancy_rule,
                    help="reference (default): as RobertZimm/DINO-QPM, tau searched on R + R^T but compared with R, "
                         "penalty min-max rescaled, negative cosines kept; clique: the lowest threshold with K "
                         f"pairwise-compatible features of R itself, penalty w R (default {defaults.redundancy_rule})")
    ap.add_argument("--redundancy-weight", type=float, default=defaults.redundancy_weight, metavar="W",
                    help=f"w, weight of the R penalty (default {defaults.redundancy_weight})")
    ap.add_argument("--time-limit", type=float, default=defaults.time_limit, metavar="S",
                    help=f"seconds for bound and MILP (default {defaults.time_limit:g})")
    ap.add_argument("--mip-gap", type=float, default=defaults.mip_gap, metavar="G",
                    help=f"relative gap at which solving stops (default {defaults.mip_gap:g})")
    ap.add_argument("--solver", default="auto", choices=("auto", "highs", "scip", "gurobi", "heuristic"),
                    help="auto = Gurobi if installed and licensed, else HiGHS (default auto)")
    ap.add_argument("--out", required=True, type=Path, help="answer JSON to write")
    ap.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    ap.add_argument("--quiet", action="store_true", help="no progress lines (stderr) and no summary (stdout)")
    return ap


def _fail(code: int, msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send file-descriptor-level stdout to stderr (HiGHS prints its banner from C++ on first use)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = _parser().parse_args(argv)
    out: Path = args.out
    if out.exists() and not args.force:
        return _fail(2, f"{out} exists; pass --force to overwrite it or choose another --out")
    if not out.parent.is_dir():
        return _fail(2, f"the folder of --out ({out.parent}) does not exist; create it first")
    try:
        cfg = QPConfig(n_features=args.n_features, n_per_class=args.n_per_class,
                       redundancy_threshold=args.redundancy_threshold, redundancy_weight=args.redundancy_weight,
                       redundancy_rule=args.redundancy_rule,
                       solver=args.solver, time_limit=args.time_limit, mip_gap=args.mip_gap)
    except ConfigError as exc:
        msg = str(exc)
        for key, flag in _FLAGS.items():
            msg = msg.replace(f"'qp.{key}'", f"{flag} (qp.{key})")
        return _fail(2, msg)
    try:
        A, R = load_inputs(args.inputs)
    except (FileNotFoundError, ValueError) as exc:
        return _fail(2, str(exc))
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        with _stdout_to_stderr():
            sel = solve_qp(A, R, cfg, log=log)
    except QPInputError as exc:  # includes QPInfeasibleError
        return _fail(2, str(exc))
    except QPSolverError as exc:
        return _fail(3, str(exc))
    except QPVerificationError as exc:
        return _fail(4, f"answer failed verification: {exc}")
    atomic_write_text(out, sel.to_json() + "\n")
    if not args.quiet:  # the one line on stdout: what was written and how good it is
        print(f"wrote {out}: status {sel.status}, objective {sel.objective:.6f}, bound {sel.bound:.6f}, "
              f"gap {sel.gap:.3%}, {sel.seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
