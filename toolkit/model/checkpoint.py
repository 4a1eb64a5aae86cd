"""Self-contained model checkpoints: `model.safetensors` (weights) + `model.json` (everything to rebuild and use it).

No pickle anywhere: export and explanation need nothing but this directory (unlike the reference, whose
fine-tuned checkpoint needs `sel.pt` on the side, docs/method.md#training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from toolkit.config import AdapterConfig, to_dict
from toolkit.files import atomic_write_bytes, atomic_write_text
from toolkit.model.dinoqpm import DinoQPM, build_dense_model
from toolkit.model.heads import LinearProbe, SparseHead

FORMAT = "dinoqpm-checkpoint/1"


def save_checkpoint(directory: Path, model: torch.nn.Module, *, kind: str, adapter: AdapterConfig | None,
                    embed_dim: int, n_classes: int, grid: tuple[int, int], meta: dict[str, Any]) -> None:
    """Write weights and the JSON that rebuilds `model` (kind: "dense", "qpm" or "probe")."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Serialised in memory, then written as any file: a full disk raises OSError (ENOSPC) naming the file.
    atomic_write_bytes(directory / "model.safetensors", save(state))
    info: dict[str, Any] = {"format": FORMAT, "kind": kind, "embed_dim": embed_dim, "n_classes": n_classes,
                            "grid": list(grid), "adapter": to_dict(adapter) if adapter else None, **meta}
    if isinstance(model, DinoQPM) and isinstance(model.head, SparseHead):
        info["selection"] = model.head.selection.tolist()
        info["n_per_class"] = int(model.head.n_per_class)
    atomic_write_text(directory / "model.json", json.dumps(info, indent=2))


def load_checkpoint(directory: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model saved by `save_checkpoint`, in eval mode, with its metadata.

    Raises:
        FileNotFoundError: the directory lacks model.json or model.safetensors.
        ValueError: the files are not a checkpoint of this toolkit, or the weights do not fit the description.
    """
    directory = Path(directory)
    for name in ("model.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing: pass a checkpoint directory written by the "
                                    "pipeline (RUN_DIR/checkpoint)")
    info = json.loads((directory / "model.json").read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{directory / 'model.json'} is not a {FORMAT} checkpoint (format={info.get('format')!r})")
    state = load_file(str(directory / "model.safetensors"))
    grid = tuple(info["grid"])
    if info["kind"] == "probe":
        model: torch.nn.Module = LinearProbe(in_dim=info["embed_dim"], n_classes=info["n_classes"], dropout=0.0)
    else:
        model = build_dense_model(AdapterConfig(**info["adapter"]), in_dim=info["embed_dim"],
                                  n_classes=info["n_classes"], dropout=0.0, grid=grid)
        if info["kind"] == "qpm":
            model = model.to_sparse(SparseHead.from_state_dict(state, prefix="head."))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights in {directory} do not match model.json ({info['kind']}): {e}") from e
    return model.eval(), info
