"""Serve an exported model on this machine: a local Ray instance running serve.app until SIGTERM or Ctrl-C.

    dinoqpm-serve --model model.onnx [--name NAME] [--host 127.0.0.1] [--port 8000] [--provider cpu|cuda]
                  [--replicas N | --min-replicas A --max-replicas B] [--num-cpus 1] [--num-gpus 0]
                  [--max-batch-size 8] [--batch-wait-ms 5] [--max-body-mb 32] [--max-image-pixels 25000000]

Prints `ready: http://HOST:PORT/ ...` once every replica has opened its session, then serves until SIGTERM or
SIGINT, when it shuts Ray Serve and its Ray instance down and exits 0. Exit status 2: a usage error (no model file,
a file without the dinoqpm metadata, --provider cuda without CUDA, impossible replica settings); 1: a replica failed
to start (its error is printed). For a cluster use `serve deploy` with a config
like serve/cluster.yaml instead (docs/serving.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinoqpm-serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="the .onnx file written by export/to_onnx.py")
    p.add_argument("--name", help="the model's name in URLs (default: the file's stem)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    p.add_argument("--replicas", type=int, default=None, help="fixed number of replicas (default 1)")
    p.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas (>= 1)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica; its ONNX Runtime threads")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 with --provider cuda)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests per batch; 1 turns batching off")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (413 above)")
    p.add_argument("--max-image-pixels", type=int, default=25_000_000, help="largest image decoded (413 above)")
    p.add_argument("--access-log", action="store_true", help="log every request (off: it costs throughput)")
    return p


def _deployment_options(args: argparse.Namespace) -> dict:
    gpus = args.num_gpus if args.num_gpus is not None else (1.0 if args.provider == "cuda" else 0.0)
    opts: dict = {"ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": gpus},
                  "logging_config": {"enable_access_log": args.access_log}}
    if args.min_replicas is not None or args.max_replicas is not None:
        if args.replicas is not None:
            raise ValueError("--replicas and --min/--max-replicas exclude each other")
        lo, hi = args.min_replicas or 1, args.max_replicas or max(args.min_replicas or 1, 1)
        if not 1 <= lo <= hi:
            raise ValueError(f"need 1 <= --min-replicas <= --max-replicas, got {lo} and {hi}")
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                      "target_ongoing_requests": max(2, args.max_batch_size)}
    else:
        if args.replicas is not None and args.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
        opts["num_replicas"] = 1 if args.replicas is None else args.replicas
    return opts


def _check_model(path: Path) -> None:
    from export._metadata import read_metadata

    if not path.is_file():
        raise ValueError(f"model file {path} does not exist")
    try:
        meta = read_metadata(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same usage error
        raise ValueError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e})") from None
    if "classes" not in meta:
        raise ValueError(f"{path} lacks the dinoqpm metadata; export it with export/to_onnx.py")


def _check_provider(provider: str) -> None:
    # Before Ray starts: a replica asking for a GPU that no one has would wait to be scheduled forever.
    import onnxruntime as ort

    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ValueError(f"--provider cuda: this onnxruntime {ort.__version__} build has no CUDA execution provider "
                         f"(available: {', '.join(ort.get_available_providers())}); install the gpu extra "
                         "(onnxruntime-gpu) or use --provider cpu")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_provider(args.provider)
        _check_model(args.model)
        options = _deployment_options(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from serve.app import application

    stop = threading.Event()
    replicas = options.get("num_replicas") or options["autoscaling_config"]["max_replicas"]
    # Workers import `serve` and `export` from wherever this file is (a checkout or site-packages).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=max(os.cpu_count() or 1, int(replicas * args.num_cpus + 0.999)), include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = application(options, model=str(args.model.resolve()), name=args.name or args.model.stem,
                          provider=args.provider, max_batch_size=args.max_batch_size,
                          batch_wait_ms=args.batch_wait_ms, max_body_mb=args.max_body_mb,
                          max_image_pixels=args.max_image_pixels)
        try:
            serve.run(app, name="dinoqpm", route_prefix="/")
        except RuntimeError as e:  # a replica failed in __init__ (e.g. CUDA did not load): Ray says why
            print(f"error: the service did not start: {e}", file=sys.stderr)
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        name = args.name or args.model.stem
        print(f"ready: http://{args.host}:{args.port}/ (upload page), model {name!r} at "
              f"http://{args.host}:{args.port}/v2/models/{name}; SIGTERM or Ctrl-C stops", flush=True)
        while not stop.wait(1.0):
            pass
        print("stopping", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
