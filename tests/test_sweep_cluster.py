"""A sweep on a Ray cluster someone else started: `ray start --head` plus a second node joined with `ray start
--address`, both on 127.0.0.1 with free ports chosen here and a temp dir of the test's own; the sweep joins it with
--address and writes its results where --output says. The test stops its own cluster only: the `ray start --block`
processes it started, then any process left that belongs to its temp dir (never `ray stop`, which would end every
Ray on the machine)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._net import free_ports
from toolkit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _env(**extra: str) -> dict[str, str]:
    """The environment of the cluster's nodes and of the sweep: no inherited RAY_* settings, and Ray's token
    authentication off (a loopback cluster of the test's own; `ray start --head` turns it on by default and the
    joining node and the sweep would each need the token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", **extra)
    return env


def _wait_for(condition, what: str, procs: list[subprocess.Popen], log: Path | None = None) -> None:
    """Return once `condition()` holds; fail at once if a `ray start` process died. The deadline only turns a hang
    into a failure, it never decides a pass."""
    deadline = time.monotonic() + 300
    while not condition():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"`{' '.join(dead[0].args[:3])}` exited with {dead[0].returncode} before {what}"
                                 + (f":\n{log.read_text()[-3000:]}" if log is not None and log.is_file() else ""))
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never happened")
        time.sleep(0.2)


def _own_processes(temp: Path) -> list[int]:
    """PIDs of the processes that mention this cluster's temp dir in their command line or environment."""
    mark = str(temp).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "cmdline").read_bytes() or mark in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A 2-node cluster (1 CPU each) started with the `ray` CLI; yields its address."""
    pytest.importorskip("ray")
    # A short path of its own: Ray's socket paths live below it and must stay under the 107-byte AF_UNIX limit.
    temp = Path(tempfile.mkdtemp(prefix="rc-"))
    env = _env(DINOQPM_TEST_CLUSTER=str(temp))
    ray = str(Path(sys.executable).parent / "ray")
    gcs, client, *ports = free_ports(14)
    address = f"127.0.0.1:{gcs}"

    def node_ports() -> list[str]:
        names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
        return [f"--{name}={ports.pop()}" for name in names]

    common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
              "--include-log-monitor=false", f"--temp-dir={temp}"]
    procs: list[subprocess.Popen] = []
    log = (temp / "cli.log").open("w")
    try:
        procs.append(subprocess.Popen([ray, "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                                       "--include-dashboard=false", *common, *node_ports()], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        # `ray start` writes the cluster's address into its temp dir once the head is up.
        _wait_for(lambda: (temp / "ray_current_cluster").is_file(), "the head node started", procs, temp / "cli.log")
        procs.append(subprocess.Popen([ray, "start", f"--address={address}", *common, *node_ports()], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        probe = [sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 "print(sum(n['Alive'] for n in ray.nodes()), int(ray.cluster_resources().get('CPU', 0)))", address]
        _wait_for(lambda: subprocess.run(probe, env=env, capture_output=True, text=True).stdout.split()[-2:]
                  == ["2", "2"], "the second node joined", procs, temp / "cli.log")
        yield address
    finally:
        for p in procs:  # SIGTERM: `ray start --block` shuts its node's processes down on the way out
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for pid in _own_processes(temp):  # anything of this cluster that outlived its node (workers)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.cluster
def test_a_sweep_joins_a_running_cluster_and_writes_where_output_says(ray_cluster: str, tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("finetune.l1_maps: {loguniform: [0.5, 5.0]}\n")
    out = tmp_path / "shared" / "sweep"  # what a cluster would keep on storage every node sees
    env = _env()
    cmd = [sys.executable, str(ROOT / "tune" / "sweep.py"), "--config", str(TINY), "--space", str(space),
           "--num-samples", "2", "--scheduler", "fifo", "--seed", "1", "--address", ray_cluster,
           "--output", str(out), f"cache.root={tmp_path / 'shared' / 'artifacts'}", "qp.n_features=8",
           "dense.epochs=3", "finetune.epochs=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "at most 2 at a time" in proc.stdout  # the sweep saw both nodes' CPUs (1 + 1), not a local Ray
    for name in ("trials.csv", "best.yaml", "sweep.json", "sweep.png", "table.txt", "request.json"):
        assert (out / name).is_file(), name
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        assert Path(r["run_dir"]).parent == out / "runs" and (Path(r["run_dir"]) / "metrics.json").is_file()
    chosen = json.loads((out / "sweep.json").read_text())["chosen_run_dir"]
    assert load_config(out / "best.yaml") == load_config(Path(chosen) / "config.yaml")
