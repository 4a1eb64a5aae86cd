"""What a cluster does to a run, simulated on one machine with real launchers and processes: two nodes on loopback
(one `deepspeed --no_ssh` launcher per node), a preemption signal that reaches one rank only, and
`launch/slurm.sbatch` run without Slurm (its `srun`, `scancel` and `scontrol` replaced by small scripts that do the
same to the local processes). Every signal is sent while the ranks wait at a step the test chose
(tests/_paused_train.py), never after a sleep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distributed import (
    BIN,
    NO_DROPOUT,
    PAUSE_AT,
    PAUSE_ENV,
    RESUME,
    ROOT,
    _args,
    _deepspeed,
    _dense_weights,
    _env,
    _finish,
    _matches_one_process,
    _max_diff,
    _rank_processes,
    _single,
)

from tests._net import free_port
from toolkit.config import ConfigError, load_config
from toolkit.train import preempt
from toolkit.train.preempt import PREEMPTED_EXIT

PAUSED = ROOT / "tests" / "_paused_train.py"
SBATCH = ROOT / "launch" / "slurm.sbatch"
# Preemption with no periodic checkpoints (the one the signal makes is the only one there is), up to the dense stage
# the signal stops (its weights must equal the uninterrupted run's exactly; the later stages only add time).
PREEMPT = [*(o for o in RESUME if not o.startswith("runtime.checkpoint_every")), "--until", "dense"]


def _wait_for(paths: list[Path], proc: subprocess.Popen) -> None:
    """Until every path exists; fails if the run ends first. The timeout only bounds a broken run."""
    deadline = time.monotonic() + 900
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, "the run ended before the pause: " + proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, f"the run never reached {paths}"
        time.sleep(0.2)


def test_preempt_grace_is_validated() -> None:
    assert load_config(None, []).runtime.preempt_grace_s == 60
    with pytest.raises(ConfigError, match="runtime.preempt_grace_s"):
        load_config(None, ["runtime.preempt_grace_s=0"])


def test_signal_only_sets_a_flag_until_uninstalled() -> None:
    assert preempt.install(60)
    try:
        assert preempt.installed() and not preempt.agreed(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)  # handled in this (main) thread before kill returns to Python code
        assert preempt.signalled() == "SIGUSR1" and preempt.agreed(torch.device("cpu"))
        grace_timer = preempt._WATCH.timer
        assert grace_timer is not None and grace_timer.is_alive()
    finally:
        preempt.uninstall()
    assert not preempt.installed() and preempt.signalled() is None
    # The grace timer is cancelled with the signal: once it ran out it would have ended this process (status 75).
    grace_timer.join(timeout=30)
    assert grace_timer.finished.is_set() and not grace_timer.is_alive()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_no_checkpoint_within_the_grace_still_exits_as_preempted() -> None:
    # A process that never reaches a training step after the signal (here: it waits forever) exits with the
    # preemption status once runtime.preempt_grace_s has passed, saying so.
    code = ("import os, signal, threading; from toolkit.train import preempt; preempt.install(0.5); "
            "os.kill(os.getpid(), signal.SIGTERM); threading.Event().wait()")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == PREEMPTED_EXIT, out.stderr
    assert "no resume checkpoint within runtime.preempt_grace_s=0.5 s of SIGTERM" in out.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_on_loopback_match_one_process(tmp_path: Path) -> None:
    # Two "nodes" of one rank each: two deepspeed launchers without ssh, each with its node rank and the same
    # --master_addr (127.0.0.1), sharing cache.root and the output folder as cluster nodes share a filesystem.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    nodes = [subprocess.Popen([str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i),
                               "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *_args(tmp_path, "two", NO_DROPOUT)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for i in (0, 1)]
    outs = [_finish(p) for p in nodes]
    assert "world_size=2 nodes=2 backend=gloo" in outs[0]
    assert "engine deepspeed (ZeRO stage 0, 2 ranks on 2 nodes, fp32), 2 synchronised BatchNorms" in outs[0]
    assert sum(o.count("run directory:") for o in outs) == 1 and "run directory:" in outs[0]  # global rank 0 only
    manifest = json.loads((tmp_path / "two" / "runs" / "r" / "manifest.json").read_text())
    assert manifest["nodes"] == 2 and manifest["world_size"] == 2
    # Each node's first rank is its local rank 0 (device index 0 on GPUs), whatever its global rank.
    assert manifest["ranks"] == [{"rank": 0, "node": 0, "local_rank": 0, "device": "cpu"},
                                 {"rank": 1, "node": 1, "local_rank": 0, "device": "cpu"}]
    _single(tmp_path, "one", NO_DROPOUT)
    _matches_one_process(tmp_path, "two", "2 nodes vs 1 process")


@pytest.mark.distributed
@pytest.mark.slow
def test_preempt_one_rank_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    # Both ranks wait before dense optimiser step PAUSE_AT's stop check; SIGUSR1 goes to rank 1 alone (as when a
    # scheduler reaches only some processes), then the ranks go on: both must stop at that step, write the resume
    # checkpoint (the only one: no periodic checkpoints) and exit with PREEMPTED_EXIT through the launcher.
    marker, go = tmp_path / "paused", tmp_path / "go"
    proc = _deepspeed(tmp_path, "preempted", PREEMPT, port=free_port(), script=PAUSED,
                      **{PAUSE_ENV: f"dense:{PAUSE_AT}:{marker}", "RESUME_WHEN": str(go)})
    _wait_for([Path(f"{marker}.rank{r}") for r in (0, 1)], proc)
    _rank_processes(proc, PAUSED)[1].send_signal(signal.SIGUSR1)
    go.touch()
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == PREEMPTED_EXIT, out[-4000:]
    assert f"dense: preempted (signal on another rank); stopped after epoch 2, micro-step 4 (optimiser step " \
           f"{PAUSE_AT})" in out
    assert "dense: preempted (SIGUSR1)" not in out  # rank 0 logs; it was not signalled itself
    assert not (tmp_path / "preempted" / "runs" / "r" / "metrics.json").exists()
    assert not list((tmp_path / "preempted" / "art" / "dense").glob("[0-9a-f]*")), "a dense artefact was published"
    resume_dir = next((tmp_path / "preempted" / "art" / "dense").glob(".work-*/resume"))
    assert (resume_dir / "latest").read_text().strip() == "epoch1-step4"
    assert sorted(p.name for p in (resume_dir / "rank-state").iterdir()) == ["epoch1-step4.rank0.pkl",
                                                                            "epoch1-step4.rank1.pkl"]
    out = _finish(_deepspeed(tmp_path, "preempted", [*PREEMPT, "--resume"], port=free_port()))
    assert "dense: resumed at epoch 2, micro-step 4" in out
    _finish(_deepspeed(tmp_path, "clean", PREEMPT, port=free_port()))
    diff = _max_diff(_dense_weights(tmp_path, "preempted"), _dense_weights(tmp_path, "clean"))
    print(f"preempted + resumed vs uninterrupted (dense model): max weight difference {diff:.3g}")
    assert diff == 0.0, f"resume after preemption is not exact: max weight difference {diff}"
    hist = [json.loads((d / "history.json").read_text()) for d in
            (next((tmp_path / n / "art" / "dense").glob("[0-9a-f]*")) for n in ("preempted", "clean"))]
    assert [h["loss"] for h in hist[0]] == [h["loss"] for h in hist[1]]


# Slurm's commands for one node, acting on local processes: srun starts the step in a process group of its own (as
# slurmstepd does) with the node's SLURM_* variables, scancel signals that group, scontrol records a requeue.
FAKE_SLURM = {
    "srun": """#!/bin/bash
while [[ $1 == -* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0
setsid "$@" &
echo $! > "$FAKE_SLURM/step.pgid"
wait $!
""",
    "scancel": """#!/bin/bash
[[ $1 == --signal=* ]] && kill -s "${1#--signal=}" -- "-$(cat "$FAKE_SLURM/step.pgid")"
echo "scancel $*" >> "$FAKE_SLURM/scancel.log"
""",
    "scontrol": """#!/bin/bash
if [[ $1 == show ]]; then echo localhost; else echo "scontrol $*" >> "$FAKE_SLURM/scontrol.log"; fi
""",
}


def test_slurm_script_parses() -> None:
    out = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = SBATCH.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text


@pytest.mark.distributed
@pytest.mark.slow
def test_slurm_script_requeues_on_preemption_then_resumes(tmp_path: Path) -> None:
    # The script as sbatch runs it on one node with 2 GPUs' worth of ranks, Slurm's own commands replaced (above).
    fake = tmp_path / "slurm"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    marker, go = tmp_path / "paused", tmp_path / "go"
    # The venv's bin last: `deepspeed` is found there, while every other tool (ninja, which builds DeepSpeed's C++ op;
    # another ninja version would rebuild it) stays the one the other tests find.
    slurm = {"PATH": f"{fake}:{os.environ['PATH']}:{BIN}", "FAKE_SLURM": str(fake), "SLURM_JOB_ID": "42",
             "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_NODELIST": "localhost", "TMPDIR": str(tmp_path),
             "CONFIG": "configs/tiny.yaml", "MASTER_ADDR": "127.0.0.1"}
    overrides = _args(tmp_path, "job", PREEMPT)[3:]  # without the script and --config: the sbatch script adds them

    def job(**extra: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", str(SBATCH), *overrides], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env=_env(**slurm, MASTER_PORT=str(free_port()), **extra))

    proc = job(TRAIN=str(PAUSED), **{PAUSE_ENV: f"dense:{PAUSE_AT}:{marker}", "RESUME_WHEN": str(go)})
    _wait_for([Path(f"{marker}.rank{r}") for r in (0, 1)], proc)
    os.kill(proc.pid, signal.SIGUSR1)  # what `--signal=B:USR1@180` does: the batch script alone
    _wait_for([fake / "scancel.log"], proc)  # the script's trap forwarded it to the step
    go.touch()
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == PREEMPTED_EXIT, out[-4000:]
    assert "dense: preempted (SIGUSR1); stopped after epoch 2, micro-step 4" in out
    assert (fake / "scontrol.log").read_text() == "scontrol requeue 42\n"
    assert not (tmp_path / "job" / "runs" / "r" / "metrics.json").exists()

    # The requeued job: the same script, untouched (it always passes --resume).
    out, _ = (proc := job()).communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert "dense: resumed at epoch 2, micro-step 4" in out
    assert (tmp_path / "job" / "runs" / "r" / "metrics.json").is_file()
    assert (fake / "scontrol.log").read_text() == "scontrol requeue 42\n"  # no second requeue
    print(f"slurm.sbatch: preempted at dense step {PAUSE_AT}, requeued, resumed to the end")
