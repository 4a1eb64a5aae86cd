"""evaluate_run on the tiny pipeline: every metric key for the three models, a deterministic metrics.json, a
report.md whose PNGs exist, and the explain CLI on image files of the same run."""

from __future__ import annotations

import json
import re
import struct
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
from toolkit.stages.evaluate import main as evaluate_main

ROOT = Path(__file__).resolve().parents[1]


def _tensorboard_scalars(folder: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a folder's event files (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
            i += 12 + n + 4
    return out


def test_tensorboard_logger_rank0_only_and_chain(tmp_path: Path) -> None:
    from toolkit.train.tensorboard import chain, epoch_logger

    assert epoch_logger(tmp_path, is_main=False) is None
    seen = []
    logger = epoch_logger(tmp_path, is_main=True)
    assert logger is not None
    callback = chain(None, logger, lambda stage, m: seen.append((stage, m["epoch"])))
    for epoch in (1, 2):
        callback("dense", {"epoch": epoch, "loss": 1.0 / epoch, "seconds": 0.5})
    assert seen == [("dense", 1), ("dense", 2)]
    events = _tensorboard_scalars(tmp_path / "tensorboard" / "dense")
    assert sorted(events) == [(1, "loss", 1.0), (1, "seconds", 0.5), (2, "loss", 0.5), (2, "seconds", 0.5)]
    assert chain(None, None) is None


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
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*tiny_overrides, "evaluate.map_images=7"])
    run_dir = run_pipeline(cfg, until="finetune").run_dir
    assert not (run_dir / "report.html").exists()
    before = json.loads((run_dir / "metrics.json").read_text())
    metrics = evaluate_run(run_dir, max_map_images=20)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    n = {"val": metrics["evaluation"]["val_images"], "test": metrics["evaluation"]["test_images"]}
    assert n == {"val": 8, "test": 40}
    for model in MODELS:
        for split in ("val", "test"):
            section = metrics[model][split]
            for key, _ in REPORTED:
                assert key in section, f"{model} lacks {key} on {split}"
            assert section["accuracy"] == before[model][split]["accuracy"]  # the pipeline's number is kept
            assert list(section["per_class_accuracy"]) == [f"class_{c}" for c in range(cfg.data.num_classes)]
            for key in ("class_independence", "contrastiveness", "correlation", "plausibility"):
                assert 0.0 <= section[key] <= 1.0, (model, key)
            for variant in VARIANTS:  # synthetic data has masks: every overlap variant under its own name
                assert 0.0 <= section[f"plausibility_{variant}"] <= 1.0
            assert section["plausibility"] == section["plausibility_gradcam_dilated"]
        # Feature metrics read the train rows the model trained on, whichever split the images come from.
        assert metrics[model]["val"]["contrastiveness"] == metrics[model]["test"]["contrastiveness"]
    for model in ("linear_probe", "dense"):
        assert 0.2 <= metrics[model]["test"]["sid_at_5"] <= 1.0
    assert cfg.qp.n_per_class < 5 and metrics["dino_qpm"]["test"]["sid_at_5"] is None  # undefined for m = 2
    assert metrics["qp_certificate"] == before["qp_certificate"]
    assert metrics["dino_qpm"]["test"]["accuracy_before_finetune"] is not None
    assert metrics["evaluation"]["map_images"] == min(20, n["test"])
    assert metrics["evaluation"]["val_map_images"] == min(20, n["val"])

    # report.md embeds PNGs that exist and open, and shows the table and the certificate.
    report = (run_dir / "report.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert {"explanations/global.png", "explanations/contrast.png", "explanations/local_0.png"} <= set(pngs)
    for rel in pngs:
        with Image.open(run_dir / rel) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert "QP certificate: status" in report
    for name in ("linear probe", "dense", "DINO-QPM"):
        assert f"| {name} | validation |" in report and f"| {name} | test |" in report
    assert "Validation: 8 train images held out (data.val_fraction=0.2" in report

    # The atlas: for every feature the training images with the highest pooled activation, strongest first, from
    # the same forward pass as the model's; the classes that use it are W's column.
    atlas = json.loads((run_dir / "explanations" / "atlas.json").read_text())
    model, info = load_checkpoint(run_dir / "checkpoint")
    from toolkit.explain.atlas import raw_features
    from toolkit.runs import load_run

    train = load_run(run_dir).train
    f = raw_features(model, train)
    assert len(atlas["features"]) == model.head.weight.shape[1] and atlas["n_images"] == len(train)
    for card in atlas["features"]:
        j = card["feature"]
        acts = [e["activation"] for e in card["examples"]]
        assert acts == sorted(acts, reverse=True) and len(acts) == min(8, len(train))
        assert acts[0] == pytest.approx(float(f[:, j].max()), rel=1e-5)
        assert card["used_by"] == np.flatnonzero(model.head.weight[:, j].numpy()).tolist()
        with Image.open(run_dir / "explanations" / card["png"]) as im:
            assert im.size == (len(acts) * 132 - 4, 128)
    index = json.loads((run_dir / "explanations" / "index.json").read_text())
    assert any(not e["correct"] for e in index["locals"]) or metrics["dino_qpm"]["test"]["accuracy"] == 1.0
    assert sorted(index["histories"]) == ["dense", "finetune", "probe"]
    assert len(index["histories"]["dense"]) == cfg.dense.epochs
    html = (run_dir / "report.html").read_text()
    assert "(lower = better)" in html and 'id="f0"' in html and 'href="#class-0"' in html

    # Training curves also went to TensorBoard: per stage, one scalar per logged key and epoch.
    events = _tensorboard_scalars(run_dir / "tensorboard" / "finetune")
    assert sorted(step for step, tag, _ in events if tag == "loss") == list(range(1, cfg.finetune.epochs + 1))
    hist = index["histories"]["finetune"]
    assert {(s, t): v for s, t, v in events}[(2, "train_accuracy")] == pytest.approx(hist[1]["train_accuracy"])

    # The global JSON is the checkpoint's W; a rerun gives an identical metrics.json.
    glob = json.loads((run_dir / "explanations" / "global.json").read_text())
    assert np.array_equal(np.asarray(glob["weight"]), model.head.weight.numpy())
    assert glob["classes"] == info["classes"]
    assert evaluate_run(run_dir, max_map_images=20) == metrics
    # dinoqpm-evaluate follows the run's evaluate.map_images unless told otherwise.
    assert evaluate_main(["--run", str(run_dir)]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["evaluation"]["map_images"] == 7
    assert evaluate_main(["--run", str(run_dir), "--max-map-images", "all"]) == 0
    evaluation = json.loads((run_dir / "metrics.json").read_text())["evaluation"]
    assert evaluation["map_images"] == evaluation["test_images"] > 7

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
