"""evaluate_run on the tiny pipeline: every metric key for the three models, a deterministic metrics.json, a
report.md whose PNGs exist, and the explain CLI on image files of the same run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.config import load_config
from toolkit.data import load_dataset
from toolkit.explain.cli import main as explain_main
from toolkit.explain.report import pick_local_samples
from toolkit.metrics import MODELS, REPORTED, VARIANTS
from toolkit.model import join_tokens, load_checkpoint
from toolkit.pipeline import run_pipeline
from toolkit.stages.evaluate import evaluate_run, map_subset

ROOT = Path(__file__).resolve().parents[1]


def test_map_subset_is_seeded_and_capped() -> None:
    assert map_subset(5, 10, seed=1).tolist() == [0, 1, 2, 3, 4]
    a, b = map_subset(100, 7, seed=3), map_subset(100, 7, seed=3)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 7 and a.tolist() == sorted(a.tolist())
    assert a.tolist() != map_subset(100, 7, seed=4).tolist()


def test_pick_local_samples_prefers_confident_correct_then_a_mistake() -> None:
    logits = np.array([[2.0, 0.0], [5.0, 0.0], [0.0, 1.0], [0.0, 3.0], [4.0, 0.0]])
    labels = np.array([0, 0, 1, 1, 1])
    assert pick_local_samples(logits, labels, (0, 1)) == [1, 3, 4]


@pytest.mark.slow
def test_evaluate_run_on_the_tiny_pipeline(tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides)
    run_dir = run_pipeline(cfg, until="finetune").run_dir
    before = json.loads((run_dir / "metrics.json").read_text())
    metrics = evaluate_run(run_dir, max_map_images=20)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    for model in MODELS:
        section = metrics[model]
        for key, _ in REPORTED:
            assert key in section, f"{model} lacks {key}"
        assert section["accuracy"] == before[model]["accuracy"]  # the pipeline's number is kept
        assert len(section["per_class_accuracy"]) == cfg.data.num_classes
        for key in ("class_independence", "contrastiveness", "correlation", "plausibility"):
            assert 0.0 <= section[key] <= 1.0, (model, key)
        for variant in VARIANTS:  # synthetic data has masks: every overlap variant under its own name
            assert 0.0 <= section[f"plausibility_{variant}"] <= 1.0
        assert section["plausibility"] == section["plausibility_gradcam_dilated"]
    for model in ("linear_probe", "dense"):
        assert 0.2 <= metrics[model]["sid_at_5"] <= 1.0
    assert cfg.qp.n_per_class < 5 and metrics["qpm"]["sid_at_5"] is None  # SID@5 is undefined for m = 2
    assert metrics["qp"] == before["qp"] and metrics["qpm"]["accuracy_before_finetune"] is not None
    assert metrics["evaluation"]["map_images"] == min(20, metrics["evaluation"]["test_images"])

    # report.md embeds PNGs that exist and open, and shows the table and the certificate.
    report = (run_dir / "report.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert {"explanations/global.png", "explanations/contrast.png", "explanations/local_0.png"} <= set(pngs)
    for rel in pngs:
        with Image.open(run_dir / rel) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert "QP certificate: status" in report
    for name in ("linear probe", "dense", "qpm"):
        assert f"| {name} |" in report

    # The global JSON is the checkpoint's W; a rerun gives an identical metrics.json.
    model, info = load_checkpoint(run_dir / "checkpoint")
    glob = json.loads((run_dir / "explanations" / "global.json").read_text())
    assert np.array_equal(np.asarray(glob["weight"]), model.head.weight.numpy())
    assert glob["classes"] == info["classes"]
    assert evaluate_run(run_dir, max_map_images=20) == metrics

    # The explain CLI runs the live backbone on image files and agrees with the cached-token prediction.
    test_set = load_dataset(cfg.data, "test")
    files = []
    for i in (0, len(test_set) - 1):
        files.append(tmp_path / f"img{i}.png")
        test_set[i][0].save(files[-1])
    out = tmp_path / "explained"
    assert explain_main(["--run", str(run_dir), "--images", *map(str, files), "--out", str(out)]) == 0
    preds = json.loads((out / "predictions.json").read_text())["predictions"]
    assert [p["png"] for p in preds] == ["img0.png", f"img{len(test_set) - 1}.png"]
    store_dir = Path(json.loads((run_dir / "manifest.json").read_text())["stages"]["tokens_test"]["directory"])
    patch = torch.from_numpy(np.load(store_dir / "patch.npy")[[0, len(test_set) - 1]].astype(np.float32))
    cls = torch.from_numpy(np.load(store_dir / "cls.npy")[[0, len(test_set) - 1]].astype(np.float32))
    with torch.no_grad():
        cached_logits = model(join_tokens(patch, cls))[0]
    for p, row in zip(preds, cached_logits):
        assert p["logit"] == pytest.approx(float(row[p["predicted"]]), abs=0.05 * (1 + abs(p["logit"])))
        assert sum(f["contribution"] for f in p["features"]) == pytest.approx(p["logit"], abs=1e-4)
        with Image.open(out / p["png"]) as im:
            assert im.format == "PNG"
    assert explain_main(["--run", str(run_dir), "--images", str(files[0]), "--out", str(out)]) == 2
    assert explain_main(["--run", str(run_dir), "--images", str(files[0]), "--out", str(out), "--force"]) == 0
