"""The parity gate: the written ONNX file under ONNX Runtime against the unfolded torch model on the same images.

fp32 graphs pass when, for logits, feature maps and features alike, max |ORT - torch| <= tolerance * max |torch|
(tolerance 1e-4 by default, `export.parity_tolerance`). fp16 graphs pass when every image keeps its torch top-1 class
and the per-image Pearson correlation of the k maps with the torch maps is >= 0.99 on every image. The torch side is
`export._graph.UnfoldedModel`: the trained model exactly as the pipeline evaluates it, nothing folded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torch import Tensor, nn

from export._graph import INPUT_NAME, OUTPUT_NAMES

FP16_MIN_MAP_CORRELATION = 0.99


@dataclass(frozen=True)
class GateImages:
    """Images in [0, 1] at one size, and where they came from."""

    images: Tensor  # (N, 3, H, W)
    sources: list[str]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])


@dataclass(frozen=True)
class ParityCheck:
    """Agreement at one input size (N images, one batch)."""

    size: tuple[int, int]
    n_images: int
    n_real: int
    logits_rel: float  # max |ORT - torch| / max |torch|
    maps_rel: float
    features_rel: float
    logits_abs: float  # max |ORT - torch|
    maps_abs: float
    top1_agree: int  # images whose ORT top-1 class equals the torch one
    min_map_correlation: float  # smallest per-image Pearson correlation of the k maps


@dataclass(frozen=True)
class ParityResult:
    precision: str
    tolerance: float
    checks: list[ParityCheck]
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def lines(self) -> list[str]:
        rule = (f"max|diff| <= {self.tolerance:g} x max|torch|" if self.precision == "fp32" else
                f"same top-1 and map correlation >= {FP16_MIN_MAP_CORRELATION}")
        out = [f"parity gate ({self.precision}, {rule}): {'PASSED' if self.passed else 'FAILED'}"]
        for c in self.checks:
            out.append(f"  {c.size[0]}x{c.size[1]}, {c.n_images} images ({c.n_real} real): logits rel "
                       f"{c.logits_rel:.2e} (abs {c.logits_abs:.2e}), maps rel {c.maps_rel:.2e} (abs {c.maps_abs:.2e}),"
                       f" features rel {c.features_rel:.2e}, top-1 {c.top1_agree}/{c.n_images}, min map corr "
                       f"{c.min_map_correlation:.5f}")
        out += [f"  FAIL: {f}" for f in self.failures] + [f"  note: {n}" for n in self.notes]
        return out


def to_unit_tensor(picture: Image.Image, size: tuple[int, int]) -> Tensor:
    """PIL image -> (3, H, W) float32 in [0, 1]: bicubic resize to `size` (H, W), then /255.

    Identical to `toolkit.data.make_transform` without its Normalize (torchvision resizes PIL images with PIL).
    """
    h, w = size
    arr = np.asarray(picture.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def make_gate_images(size: tuple[int, int], *, real: Sequence[tuple[str, Image.Image]], n_random: int,
                     seed: int = 0) -> GateImages:
    """`n_random` uniform-noise images (seeded) plus the `real` pictures, all at `size` (H, W)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(n_random, 3, size[0], size[1], generator=gen)
    pics = [to_unit_tensor(p, size) for _, p in real]
    images = torch.cat([noise, *(p.unsqueeze(0) for p in pics)]) if pics else noise
    return GateImages(images=images, sources=[f"random:{i}" for i in range(n_random)] + [name for name, _ in real])


def _rel(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(a.astype(np.float64) - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return diff / max(scale, 1e-12), diff


def _min_correlation(a: np.ndarray, ref: np.ndarray) -> float:
    """Smallest per-image Pearson correlation of flattened (k, h, w) maps; constant maps count as 1 if equal."""
    worst = 1.0
    for x, y in zip(a.reshape(len(a), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)):
        sx, sy = x.std(), y.std()
        if sx < 1e-12 or sy < 1e-12:
            corr = 1.0 if np.allclose(x, y, atol=1e-3 * (1.0 + np.abs(y).max())) else 0.0
        else:
            corr = float(np.mean((x - x.mean()) * (y - y.mean())) / (sx * sy))
        worst = min(worst, corr)
    return worst


def open_session(path: str | Path, *, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session (the gate runs where the export runs, which may have no GPU)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: fp16 graphs make ORT log benign cast-placement warnings
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def run_gate(session: ort.InferenceSession, reference: nn.Module, batches: Sequence[GateImages], *, precision: str,
             tolerance: float) -> ParityResult:
    """Run every batch through ORT and through `reference`, compare, and collect failures with their numbers.

    Args:
        session: ORT session on the exported file.
        reference: `UnfoldedModel` in float32, eval mode (returns logits, maps, features).
        batches: images per size.
        precision: "fp32" or "fp16" (which rule applies).
        tolerance: fp32 relative tolerance.
    """
    checks, failures = [], []
    for batch in batches:
        ort_out = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch.images.numpy()})))
        ref = dict(zip(OUTPUT_NAMES, (t.double().numpy() for t in reference(batch.images))))
        for name in OUTPUT_NAMES:
            if ort_out[name].shape != ref[name].shape:
                failures.append(f"{name} has shape {ort_out[name].shape} in ONNX Runtime but {ref[name].shape} in "
                                f"torch at {batch.size}")
        if failures:
            break
        (lr, la), (mr, ma), (fr, _) = (_rel(ort_out[n], ref[n]) for n in OUTPUT_NAMES)
        top1 = int((ort_out["logits"].argmax(1) == ref["logits"].argmax(1)).sum())
        corr = _min_correlation(ort_out["feature_maps"], ref["feature_maps"])
        n_real = sum(not s.startswith("random:") for s in batch.sources)
        check = ParityCheck(size=batch.size, n_images=len(batch.sources), n_real=n_real, logits_rel=lr, maps_rel=mr,
                            features_rel=fr, logits_abs=la, maps_abs=ma, top1_agree=top1, min_map_correlation=corr)
        checks.append(check)
        where = f"at {batch.size[0]}x{batch.size[1]}"
        if precision == "fp32":
            for name, rel in (("logits", lr), ("feature_maps", mr), ("features", fr)):
                if not rel <= tolerance:  # also catches NaN
                    failures.append(f"{name} {where}: max |ORT - torch| / max |torch| = {rel:.3e} > {tolerance:g}")
        else:
            if top1 != check.n_images:
                failures.append(f"top-1 {where}: {check.n_images - top1} of {check.n_images} images change class")
            if not corr >= FP16_MIN_MAP_CORRELATION:
                failures.append(f"feature_maps {where}: min per-image correlation {corr:.5f} < "
                                f"{FP16_MIN_MAP_CORRELATION}")
    return ParityResult(precision=precision, tolerance=tolerance, checks=checks, failures=failures)


__all__ = ["FP16_MIN_MAP_CORRELATION", "GateImages", "ParityCheck", "ParityResult", "make_gate_images",
           "open_session", "run_gate", "to_unit_tensor"]
