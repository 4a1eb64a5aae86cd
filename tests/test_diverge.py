"""A diverging loss: a non-finite loss or weight stops the stage within the micro-step it appears in, on every rank,
naming the stage, epoch, step and the last good checkpoint (docs/distributed.md#when-things-go-wrong).

The divergence is made deterministic with an absurd learning rate (dense.lr=1e8 on the tiny config): the first
optimiser step blows the weights up, and a few micro-steps later they are inf/NaN.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests._net import free_port
from tests.test_distributed import _deepspeed, _Tokens
from toolkit.config import ProbeConfig, load_config
from toolkit.console import Console
from toolkit.model import LinearProbe
from toolkit.pipeline import run_pipeline
from toolkit.train import DivergedError, TorchEngine, fit

ROOT = Path(__file__).resolve().parents[1]
DIVERGE = ["dense.lr=1e8", "runtime.checkpoint_every=1", "runtime.progress=false"]
MESSAGE = re.compile(r"stage 'dense' diverged at dense epoch (\d+)/\d+, micro-step (\d+): the (?:loss|weights) "
                     r"became non-finite.*stopped on every rank.*The last good checkpoint is (\S+) \(saved at "
                     r"(.*?)\); `--resume` continues from it.*Lower dense\.lr")


def test_a_nan_input_stops_fit_in_its_micro_step_before_any_checkpoint() -> None:
    data = _Tokens(12)
    data.cls[:] = float("nan")  # every batch gives a NaN loss: the first micro-step must stop
    model = LinearProbe(in_dim=6, n_classes=3, dropout=0.0)
    cfg = ProbeConfig(epochs=2, batch_size=4, lr=0.1)
    engine = TorchEngine(module=model, cfg=cfg, total_steps=6, device=torch.device("cpu"))
    saved: list[dict] = []
    with pytest.raises(DivergedError, match=r"^t epoch 1/2, micro-step 1: the loss became non-finite \(loss nan"):
        fit(engine, data, cfg, micro_batch=4, seed=0, backbone=None, console=Console(enabled=False), name="t",
            checkpoint=lambda e, state, mine: saved.append(dict(state)), every=1)
    assert saved == []  # the step that met the NaN was never checkpointed


def test_diverging_dense_stage_stops_at_once_naming_the_last_good_checkpoint(tiny_overrides: list[str],
                                                                             tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*tiny_overrides, *DIVERGE, "probe_dinov2.enabled=false"])
    with pytest.raises(DivergedError) as e:
        run_pipeline(cfg, until="dense")
    found = MESSAGE.search(str(e.value))
    assert found, str(e.value)
    epoch, step, checkpoint = int(found[1]), int(found[2]), Path(found[3])
    # One checkpoint per optimiser step (grad_accum 1): the last good one is the step before the one that diverged.
    assert found[4] == (f"epoch {epoch}, micro-step {step - 1}" if step > 1 else f"after epoch {epoch - 1}")
    state = torch.load(checkpoint / "engine.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    dense = tmp_path / "artifacts" / "dense"
    assert not [p for p in dense.iterdir() if not p.name.startswith((".work-", "."))]  # nothing published
    assert not list(dense.glob(".tmp-*"))  # and nothing half-published


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_both_stop_at_the_same_step_and_the_job_fails(tmp_path: Path) -> None:
    proc = _deepspeed(tmp_path, "nan", [*DIVERGE, "probe_dinov2.enabled=false", "--until", "dense"],
                      port=free_port())
    out, _ = proc.communicate(timeout=600)  # a hang guard only: a rank left waiting in a collective would hit it
    assert proc.returncode != 0, out[-4000:]
    stops = MESSAGE.findall(out)
    assert len(stops) == 2, out[-4000:]  # one message per rank ...
    assert stops[0] == stops[1]  # ... at the same epoch and micro-step, naming the same checkpoint
