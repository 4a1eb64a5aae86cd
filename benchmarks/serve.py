"""Requests/s and latency of `dinoqpm-serve` under load, per ingress, replica layout and batching, beside in-process
ONNX Runtime, and a bounded load run that must end with zero errors. All in one run, all traffic on 127.0.0.1.

    python benchmarks/serve.py --model runs/demo.onnx [--cpus 2] [--requests 400] [--concurrency 1 8 32]
                               [--modes haproxy-2x1 ...] [--max-batch-size 8] [--batch-wait-ms 10]
                               [--load-requests 3000] [--json OUT]

Each mode (MODES: the ingress, Ray Serve's Python proxy or its HAProxy ingress; `--cpus` cores as one replica with
that many ONNX Runtime threads or as that many one-thread replicas; batching on, `--max-batch-size`, or off, 1)
starts the service as a user starts it (`python -m serve.cli`) on a free port, and the stock `tritonclient.http`
sends `--requests` requests of one image each (binary tensors, every output returned, as the client does by
default) from `c` client threads for each concurrency c; per request the wall time from send to parsed result is
the latency. Right after each level, in-process ONNX Runtime with `--cpus` threads (the service's cores, the
whole machine by default) runs the batch the service could form (min(c, max batch size); 1 with batching off)
back to back: images/s, so both figures see the same machine load. Then, in the first mode, `--load-requests`
requests at the highest concurrency; every 50th answer is compared with in-process ONNX Runtime (max |diff| <=
1e-5) and any error or mismatch is counted. The client threads share the machine's cores with the service (as on
one host).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import requests
import tritonclient.http as th

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Mode:
    """One way to serve `--cpus` cores: the ingress, replicas x ONNX Runtime threads each, batching."""

    key: str
    ingress: str  # "proxy" | "haproxy" (dinoqpm-serve --ingress)
    one_thread_replicas: bool  # --cpus replicas of 1 thread, else 1 replica of --cpus threads
    batching: bool

    def layout(self, cpus: int) -> tuple[int, int]:
        """(replicas, threads per replica)."""
        return (cpus, 1) if self.one_thread_replicas else (1, cpus)

    def describe(self, cpus: int) -> str:
        replicas, threads = self.layout(cpus)
        return (f"{'HAProxy' if self.ingress == 'haproxy' else 'Python proxy'}, {replicas} x {threads} thread"
                f"{'s' if threads > 1 else ''}, batching {'on' if self.batching else 'off'}")


MODES = {m.key: m for m in (Mode("haproxy-Nx1", "haproxy", True, True),
                            Mode("haproxy-Nx1-nobatch", "haproxy", True, False),
                            Mode("haproxy-1xN", "haproxy", False, True),
                            Mode("proxy-Nx1", "proxy", True, True),
                            Mode("proxy-1xN", "proxy", False, True))}


def start(model: Path, mode: Mode, cpus: int, max_batch_size: int, wait_ms: float,
          log: Path) -> tuple[subprocess.Popen, str]:
    """dinoqpm-serve on a free port; returns the process and host:port once /v2/health/ready says 200."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    replicas, threads = mode.layout(cpus)
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "--model", str(model), "--port", str(port),
                             "--ingress", mode.ingress, "--replicas", str(replicas), "--num-cpus", str(threads),
                             "--max-batch-size", str(max_batch_size if mode.batching else 1),
                             "--batch-wait-ms", str(wait_ms)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env)
    while True:
        if proc.poll() is not None:
            sys.exit(f"dinoqpm-serve exited with {proc.returncode}; see {log}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 200:
                return proc, f"127.0.0.1:{port}"
        except requests.ConnectionError:
            pass
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def drive(host: str, name: str, images: np.ndarray, n: int, concurrency: int,
          check: ort.InferenceSession | None = None) -> dict:
    """`n` requests (image i % len(images)) from `concurrency` threads; requests/s, p50/p99 ms, errors."""
    lock, latencies, errors, next_i = threading.Lock(), [], [], [0]

    def worker() -> None:
        client = th.InferenceServerClient(host, connection_timeout=120, network_timeout=120)
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= n:
                return
            x = images[i % len(images)][None]
            inp = th.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            t0 = time.perf_counter()
            try:
                out = client.infer(name, [inp])
                dt = time.perf_counter() - t0
                if check is not None and i % 50 == 0:
                    want = check.run(["logits", "feature_maps"], {"image": x})
                    if max(float(np.abs(out.as_numpy(k) - w).max()) for k, w in zip(("logits", "feature_maps"),
                                                                                      want)) > 1e-5:
                        raise AssertionError(f"request {i}: outputs differ from in-process ONNX Runtime")
            except Exception as e:  # noqa: BLE001 - every failure counts as an error of the run
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(dt)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": n, "errors": len(errors), "first_errors": errors[:3],
            "rps": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None, "wall_s": wall}


def in_process(model: Path, threads: int, images: np.ndarray, batch: int, calls: int) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    x = np.concatenate([images] * (batch // len(images) + 1))[:batch]
    for _ in range(3):
        sess.run(None, {"image": x})
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        sess.run(None, {"image": x})
        times.append(time.perf_counter() - t0)
    per_call = statistics.median(times)
    return {"batch": batch, "images_per_s": batch / per_call, "ms_per_call": per_call * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                   help="the service's cores (replicas x threads) and in-process ONNX Runtime's threads")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                   help="N = --cpus; the first mode also runs the load run")
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level and mode")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--load-requests", type=int, default=3000)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    name = args.model.stem
    rng = np.random.default_rng(0)
    sess = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    images = rng.random((16, *sess.get_inputs()[0].shape[1:]), dtype=np.float32)
    report: dict = {"model": str(args.model), "cpus": args.cpus, "max_batch_size": args.max_batch_size,
                    "batch_wait_ms": args.batch_wait_ms, "load_before": os.getloadavg(), "service": []}
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    for i, key in enumerate(args.modes):
        mode = MODES[key]
        proc, host = start(args.model, mode, args.cpus, args.max_batch_size, args.batch_wait_ms,
                           log_dir / f"serve_bench_{key}.log")
        try:
            drive(host, name, images, 40, 4)  # warm-up
            for c in args.concurrency:
                row = {"mode": mode.describe(args.cpus), "key": key, **drive(host, name, images, args.requests, c)}
                # In-process ORT right after, at the batch the service could form, so both see the same load.
                batch = min(c, args.max_batch_size) if mode.batching else 1
                row["ort"] = in_process(args.model, args.cpus, images, batch, max(10, args.requests // (4 * batch)))
                row["ratio_to_ort"] = row["rps"] / row["ort"]["images_per_s"]
                report["service"].append(row)
                print(json.dumps(row), flush=True)
            if i == 0:
                report["load"] = {"mode": mode.describe(args.cpus),
                                  **drive(host, name, images, args.load_requests, max(args.concurrency), check=sess)}
                print("load", json.dumps(report["load"]), flush=True)
        finally:
            stop(proc)
    report["load_after"] = os.getloadavg()
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def table(report: dict) -> str:
    lines = ["| mode | concurrency | requests/s | p50 ms | p99 ms | p99/p50 | errors | in-process ORT, same batch: "
             "images/s (batch) | service / ORT |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["service"]:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['p99_ms'] / r['p50_ms']:.2f} | {r['errors']} | {r['ort']['images_per_s']:.1f} "
                     f"({r['ort']['batch']}) | {r['ratio_to_ort']:.2f} |")
    load = report.get("load")
    if load:
        lines.append(f"\nload run ({load['mode']}): {load['requests']} requests at concurrency {load['concurrency']}: "
                     f"{load['rps']:.1f} requests/s, p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, "
                     f"{load['errors']} errors {load['first_errors']}")
    lines.append(f"load average before {[round(v, 2) for v in report['load_before']]}, after "
                 f"{[round(v, 2) for v in report['load_after']]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
