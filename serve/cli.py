"""Serve an exported model on this machine: a local Ray instance running serve.app until SIGTERM or Ctrl-C.

    dinoqpm-serve --model model.onnx [--name NAME] [--host 127.0.0.1] [--port 8000] [--provider cpu|cuda]
                  [--ingress proxy|haproxy] [--replicas N | --min-replicas A --max-replicas B]
                  [--num-cpus 1] [--num-gpus 0]
                  [--max-batch-size 8] [--batch-wait-ms 5] [--max-body-mb 32] [--max-image-pixels 25000000]

Prints `ready: http://HOST:PORT/ ...` once every replica has opened its session, then serves until SIGTERM or
SIGINT, when it shuts Ray Serve and its Ray instance down and exits 0. Exit status 2: a usage error (no model file,
a file without the dinoqpm metadata, --provider cuda without CUDA, impossible replica settings); 1: a replica failed
to start (its error is printed). For a cluster use `serve deploy` with a config
like serve/cluster.yaml instead (docs/serving.md).

`--ingress haproxy` is Ray Serve's high-throughput ingress (Ray >= 2.56, its HAProxy binary ships with
ray[serve]): HAProxy in front, each replica answering HTTP itself, instead of Ray Serve's Python proxy actor
forwarding every request to a replica. On 2 CPU cores it serves about 1.4x the requests/s (BENCHMARKS.md,
"Serving"). It is not the default because HAProxy also opens a statistics page and a Prometheus endpoint on every
interface (on free ports this command picks and prints); the proxy binds `--host` alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import tempfile
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
    p.add_argument("--ingress", choices=("proxy", "haproxy"), default="proxy",
                   help="proxy: Ray Serve's HTTP proxy actor (binds --host only); haproxy: Ray Serve's HAProxy "
                        "ingress, ~1.4x the throughput, but its stats and metrics ports listen on every interface")
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


def _free_ports(n: int) -> list[int]:
    """n distinct ports free now (all held open together while they are picked, so no two are the same)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]


def _ingress_env(ingress: str, workdir: Path) -> dict[str, str]:
    """Environment for Ray Serve's HAProxy ingress on this machine; empty for the proxy.

    Ray reads these when its modules load, in this process and in the workers its raylet starts, so they must be in
    os.environ before `ray` is imported. HAProxy's defaults are fixed: ports 8404 (stats) and 9101 (metrics) and
    files under /tmp/haproxy-serve, which a second service on the same machine would collide with; each service
    gets free ports and its own folder. Direct ingress keeps a stopping replica's port open 30 s for an outside load
    balancer to notice; here HAProxy is local and removes it at once, so 2 s is enough. A value already in the
    environment wins.
    """
    if ingress != "haproxy":
        return {}
    stats, metrics = _free_ports(2)
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1",
           "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
           "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
           "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(workdir / "haproxy.cfg"),
           "RAY_SERVE_HAPROXY_SOCKET_PATH": str(workdir / "admin.sock"),
           "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(workdir),
           "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(workdir / "server-state"),
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    return {k: os.environ.get(k, v) for k, v in env.items()}


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
    with tempfile.TemporaryDirectory(prefix="dinoqpm-serve-") as workdir:
        ingress = _ingress_env(args.ingress, Path(workdir))
        os.environ.update(ingress)
        return _serve(args, options, ingress)


def _serve(args: argparse.Namespace, options: dict, ingress: dict[str, str]) -> int:
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
        if ingress:
            print(f"ingress: HAProxy; its statistics page (port {ingress['RAY_SERVE_HAPROXY_STATS_PORT']}) and "
                  f"Prometheus metrics (port {ingress['RAY_SERVE_HAPROXY_METRICS_PORT']}) listen on every interface",
                  flush=True)
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
