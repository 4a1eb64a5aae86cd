"""Run by tests/test_distributed.py in its own process (it joins a 1-rank gloo group): trains a small DINO-QPM
through `train_model` with the DeepSpeed engine in bf16 and checks that the weights it leaves in the model (and
that `save_checkpoint` writes) are DeepSpeed's fp32 master weights, not the bf16 parameters."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from toolkit.config import AdapterConfig, DenseConfig, RuntimeConfig
from toolkit.console import Console
from toolkit.distributed import shutdown_distributed
from toolkit.model import build_dense_model, save_checkpoint
from toolkit.train import TrainContext, make_engine_factory, train_model


class _Split:
    """Random tokens of 3 classes as a cached split (patch (N, 4, 16), cls (N, 16))."""

    key = "bf16-test"

    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 3
        self.patch = torch.randn(n, 4, 16, generator=g) + self.labels[:, None, None].float()
        self.cls = torch.randn(n, 16, generator=g)

    def dataset(self, *, patch: bool = True) -> list[dict[str, torch.Tensor]]:
        rows = [{"patch": self.patch[i], "cls": self.cls[i], "label": self.labels[i], "index": torch.tensor(i)}
                for i in range(len(self.labels))]
        return rows if patch else [{k: v for k, v in row.items() if k != "patch"} for row in rows]


def main() -> int:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    # No BatchNorm: CPU autocast runs batch_norm in fp32, which refuses the bf16 BN weights DeepSpeed made (CUDA
    # autocast keeps it in bf16); the master-weight path under test does not depend on it.
    adapter = AdapterConfig(n_layers=2, hidden_dim=32, n_features=8, batch_norm=False)
    model = build_dense_model(adapter, in_dim=16, n_classes=3, dropout=0.0, grid=(2, 2))
    cfg = DenseConfig(epochs=2, batch_size=8, lr=3e-3)
    runtime = RuntimeConfig(engine="deepspeed", precision="bf16", device="cpu")
    seen: dict[str, object] = {}

    def factory(module, tcfg, steps, name):  # the product's factory; keeps the engine for the checks below
        engine = make_engine_factory(runtime, torch.device("cpu"), "bf16")(module, tcfg, steps, name)
        seen["engine"] = engine
        seen["compute_dtypes"] = sorted({str(p.dtype) for p in module.parameters()})  # what the forward used
        return engine

    ctx = TrainContext(console=Console(enabled=False), device=torch.device("cpu"), seed=0, grad_accum=1,
                       make_engine=factory)
    train_model(model, _Split(), cfg, ctx, name="dense", work=Path(tempfile.mkdtemp()) / "work")
    engine = seen["engine"]
    # The optimiser's fp32 copy, read independently of the engine's master_state_dict (ZeRO 0 + bf16: DeepSpeed's
    # fp16/bf16 optimiser wrapper keeps it in fp32_groups, in the order of fp16_groups).
    opt = engine.optimizer
    ids = {id(p): n for n, p in engine.raw.named_parameters()}
    master = {ids[id(lp)]: hp.detach().float() for lg, hg in zip(opt.fp16_groups, opt.fp32_groups)
              for lp, hp in zip(lg, hg)}
    out = Path(tempfile.mkdtemp()) / "ckpt"
    save_checkpoint(out, model, kind="dense", adapter=adapter, embed_dim=16, n_classes=3, grid=(2, 2), meta={})
    saved = load_file(str(out / "model.safetensors"))
    report = {
        "optimizer": type(opt).__name__,
        "compute_dtypes": seen["compute_dtypes"],
        "saved_dtypes": sorted({str(v.dtype) for v in saved.values()}),
        "max_saved_minus_master": max(float((saved[n] - m).abs().max()) for n, m in master.items()),
        # Share of saved weights that a bf16 number cannot hold: ~1 for fp32 masters, exactly 0 for a bf16 copy.
        "not_bf16_representable": sum(int((saved[n] != saved[n].bfloat16().float()).sum()) for n in master)
        / sum(saved[n].numel() for n in master),
    }
    print("BF16_REPORT " + json.dumps(report), flush=True)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
