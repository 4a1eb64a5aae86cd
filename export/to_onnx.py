"""Export a trained DINO-QPM run as one ONNX graph: image in [0, 1] -> logits, feature maps, features.

    python export/to_onnx.py --run RUN_DIR --out model.onnx [--opset 18] [--image-size H W | --dynamic-image-size]
                             [--fp16 | --int8] [--force] [--no-unfolded-report]

The backbone's normalisation, the frozen ViT, the adapter (BatchNorm folded, last layer pruned to the k selected
channels) and the sparse head (mean/std folded into one (C, k) matrix plus bias) become one graph. After writing,
ONNX Runtime and the unfolded torch model run the same images; the file is kept only if they agree (fp32: max |diff|
<= export.parity_tolerance x max |torch|; fp16: same top-1 and map correlation >= 0.99). `--int8` quantises the
weight MatMuls of the gated fp32 graph (recipe: the run's `export.int8_*` config) and keeps the file only if, on
held-out images of the run, it agrees with the fp32 graph: top-1 agreement, per-image feature-map correlation,
rank agreement of the predicted class's contributions and accuracy drop within `export.int8_*` thresholds. Exit
status: 0 written, 1 a gate failed (nothing written), 2 usage error. `--force` overwrites --out and writes even a
failed export, with a warning. Options left out come from the run's `export` config section; `--int8-option
KEY=VALUE` overrides one `export.int8_KEY` for this export. `--no-unfolded-report` skips the second export that
measures the unfolded graph for the size report. `--triton-repo DIR` also lays the written model out as a Triton
model repository `DIR/<--out's stem>/` (config.pbtxt, 1/model.onnx, labels.txt; export/_triton.py, docs/serving.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export._build import ExportError, ParityError, export_run
from export._triton import write_triton_repo
from toolkit.config import parse_value


def _int8_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. min_top1_agreement=0.995), got {text!r}")
    return key.strip().removeprefix("export.").removeprefix("int8_"), parse_value(value)  # YAML 1.2: 1e-3 is a number


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python export/to_onnx.py", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="run directory (config.yaml, checkpoint/)")
    parser.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset, >= 17 (default: export.opset, 18)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                      help="fixed input size, multiples of 14 (default: the training size)")
    size.add_argument("--dynamic-image-size", action="store_true", default=None,
                      help="H and W as dynamic axes (multiples of 14)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", default=None,
                           help="float16 weights and compute (inputs and outputs stay float32)")
    precision.add_argument("--int8", action="store_true", default=None,
                           help="int8 weights of the ViT and adapter MatMuls, gated against fp32 on held-out images")
    parser.add_argument("--int8-option", type=_int8_option, action="append", default=[], metavar="KEY=VALUE",
                        help="override export.int8_KEY for this export, e.g. mode=static or min_top1_agreement=1 "
                             "(repeatable)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite --out, and write the model even if a gate fails")
    parser.add_argument("--no-unfolded-report", action="store_true",
                        help="skip exporting the unfolded graph, which only serves the before/after size report "
                             "(saves one export; parameter counts are still reported)")
    parser.add_argument("--triton-repo", type=Path, metavar="DIR",
                        help="also write a Triton model repository DIR/<name>/ for the model (<name>: --out's stem)")
    args = parser.parse_args(argv)
    if args.triton_repo and (args.triton_repo / args.out.stem).exists() and not args.force:
        print(f"error: {args.triton_repo / args.out.stem} exists already; pass --force to replace it or choose another "
              "--triton-repo", file=sys.stderr)
        return 2
    try:
        result = export_run(args.run, args.out, opset=args.opset,
                            image_size=tuple(args.image_size) if args.image_size else None,
                            dynamic_image_size=args.dynamic_image_size, fp16=args.fp16, int8=args.int8,
                            force=args.force, measure_unfolded=not args.no_unfolded_report,
                            int8_overrides=dict(args.int8_option))
    except ParityError as e:  # the numbers were printed with the gate's report above
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.forced:
        print("WARNING: a gate FAILED and --force wrote the model anyway; its outputs differ from the trained "
              f"model's (dinoqpm.parity / dinoqpm.int8_gate in {result.path} record the numbers)", file=sys.stderr)
    if args.triton_repo:
        folder = write_triton_repo(result.path, args.triton_repo, force=args.force)
        print(f"wrote the Triton model repository {folder} (config.pbtxt, 1/model.onnx, labels.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
