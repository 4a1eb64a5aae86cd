"""Reproducing the paper: CUB and Stanford Cars end to end on generated archives, the DINOv2-protocol probe, the
schedule-free optimiser and the reference QP redundancy rule.

The generated datasets are laid out exactly as the official archives extract (CUB_200_2011.tgz plus the separate
segmentations.tgz; the Cars devkit .mat files, image folders and the labelled test annotations), with real-world
quirks (grayscale and CMYK JPEGs, non-square images, soft mask borders). The backbone is a tiny random DINOv2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import schedulefree
import scipy.io as sio
import torch
from PIL import Image, ImageDraw

from toolkit.artifacts import Manifest, describe_files
from toolkit.cache import TokenStore, holdout_views
from toolkit.config import ConfigError, DataConfig, DenseConfig, ProbeDinov2Config, QPConfig, load_config
from toolkit.console import Console
from toolkit.data import holdout, stratified_holdout
from toolkit.metrics import structural_grounding
from toolkit.model import load_checkpoint
from toolkit.pipeline import run_pipeline
from toolkit.qp import build_problem, choose_tau, solve_qp
from toolkit.qp.threshold import reference_pairs
from toolkit.stages.probe_dinov2 import run_probe_dinov2
from toolkit.train import TrainContext
from toolkit.train.engine import TorchEngine
from toolkit.train.optim import set_optimizer_mode

REPO = Path(__file__).resolve().parents[1]
COLOURS = [(200, 40, 40), (40, 180, 60), (50, 80, 230)]


def _picture(c: int, k: int, size: tuple[int, int]) -> tuple[Image.Image, np.ndarray]:
    """A class-coloured blob at a class-specific place on a noisy background, and its soft-bordered mask."""
    w, h = size
    rng = np.random.default_rng([c, k])
    img = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
    mask = Image.new("L", (w, h), 0)
    cx, cy = w * (0.3 + 0.2 * c), h * (0.35 + 0.15 * c)
    r = min(w, h) * 0.22
    box = [cx - r, cy - r, cx + r, cy + r]
    ImageDraw.Draw(img).ellipse(box, fill=COLOURS[c])
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    m = np.asarray(mask).copy()
    m[0, 0] = 3  # a faint soft-border value far from the object: still "object" (> 0), as in CUB's masks
    return img, m


def _save_jpeg(img: Image.Image, path: Path, quirk: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if quirk == "gray":
        img = img.convert("L")  # a handful of CUB and Cars images are single-channel JPEGs
    elif quirk == "cmyk":
        img = img.convert("CMYK")
    img.save(path, "JPEG", quality=95)


def make_cub(parent: Path, per_class: tuple[int, int] = (4, 2)) -> Path:
    """CUB_200_2011.tgz and segmentations.tgz extracted side by side into `parent`; returns `parent`."""
    root = parent / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    lines: dict[str, list[str]] = {"images": [], "labels": [], "split": [], "bbox": []}
    i = 0
    for c, cname in enumerate(classes):
        for k in range(sum(per_class)):
            i += 1
            rel = f"{cname}/{cname[4:]}_{1000 + i:04d}_{k}.jpg"
            size = (64 + 8 * (k % 3), 48 + 4 * c)  # non-square, varied
            img, m = _picture(c, k, size)
            _save_jpeg(img, root / "images" / rel, "gray" if i == 2 else "cmyk" if i == 5 else "rgb")
            seg = parent / "segmentations" / Path(rel).with_suffix(".png")
            seg.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(seg)
            lines["images"].append(f"{i} {rel}")
            lines["labels"].append(f"{i} {c + 1}")
            lines["split"].append(f"{i} {int(k < per_class[0])}")
            lines["bbox"].append(f"{i} 1.0 2.0 30.0 20.0")
    for name, key in (("images.txt", "images"), ("image_class_labels.txt", "labels"),
                      ("train_test_split.txt", "split"), ("bounding_boxes.txt", "bbox")):
        (root / name).write_text("\n".join(lines[key]) + "\n")
    (root / "classes.txt").write_text("".join(f"{k + 1} {c}\n" for k, c in enumerate(classes)))
    n_attr = 12
    (parent / "attributes.txt").write_text("".join(f"{a + 1} has_attr::{a}\n" for a in range(n_attr)))
    att = root / "attributes"
    att.mkdir()
    rng = np.random.default_rng(5)
    cont = rng.uniform(0, 100, (len(classes), n_attr))
    cont[1] = cont[0] + rng.uniform(0, 5, n_attr)  # classes 0 and 1 look alike
    (att / "class_attribute_labels_continuous.txt").write_text(
        "".join(" ".join(f"{v:.10f}" for v in row) + "\n" for row in cont))
    (att / "certainties.txt").write_text("1 not visible\n2 guessing\n3 probably\n4 definitely\n")
    (att / "image_attribute_labels.txt").write_text(
        "".join(f"{j} {a + 1} {int(rng.integers(0, 2))} 3 1.5\n" for j in range(1, i + 1) for a in range(n_attr)))
    return parent


def _annos(rows: list[tuple[int, str]], labelled: bool = True) -> np.ndarray:
    # The devkit's 1 x N struct array; every numeric field a 1 x 1 uint8 matrix, fname a string.
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if labelled else []) + ["fname"]
    a = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
    for j, (cls, fname) in enumerate(rows):
        nums = [np.array([[v]], dtype=np.uint8) for v in (1, 2, 40, 30)]
        a[0, j] = tuple(nums + ([np.array([[cls]], dtype=np.uint8)] if labelled else []) + [np.array([fname])])
    return a


def make_cars(root: Path, per_class: tuple[int, int] = (4, 2)) -> Path:
    """car_devkit.tgz, cars_train.tgz, cars_test.tgz extracted into `root`, plus cars_test_annos_withlabels.mat."""
    (root / "devkit").mkdir(parents=True)
    names = np.empty((1, 3), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    sio.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    rows: dict[str, list[tuple[int, str]]] = {"train": [], "test": []}
    for split, n in (("train", per_class[0]), ("test", per_class[1])):
        k = 0
        for rep in range(n):
            for c in (2, 0, 1):  # the devkit's images are not sorted by class
                k += 1
                fname = f"{k:05d}.jpg"
                img, _ = _picture(c, 10 * rep + (split == "test"), (72, 40))
                quirk = "gray" if (split, k) in (("train", 3), ("test", 2)) else "rgb"
                _save_jpeg(img, root / f"cars_{split}" / fname, quirk)
                rows[split].append((c + 1, fname))
    sio.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _annos(rows["train"])})
    sio.savemat(root / "devkit" / "cars_test_annos.mat", {"annotations": _annos(rows["test"], labelled=False)})
    sio.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _annos(rows["test"])})
    return root


def _tiny_overrides(tmp: Path, dataset: str, root: Path) -> list[str]:
    return [f"data.dataset={dataset}", f"data.root={root}", "data.image_size=56", "data.preprocess=reference",
            "backbone.name=vit_small_patch14_reg4_dinov2", "backbone.weights=none", "backbone.depth=2",
            "backbone.embed_dim=64", "backbone.num_heads=2", "backbone.batch_size=8",
            "adapter.n_layers=2", "adapter.hidden_dim=32", "adapter.n_features=12",
            "dense.epochs=3", "dense.batch_size=4", "dense.lr=1e-2", "dense.optimizer=schedulefree_adamw",
            "dense.schedule=constant", "probe.epochs=2", "probe.batch_size=4", "probe.optimizer=schedulefree_adamw",
            "probe.schedule=constant", "probe_dinov2.epochs=3", "probe_dinov2.batch_size=4",
            "probe_dinov2.lrs=[1e-3, 1e-1]", "qp.n_features=6", "qp.n_per_class=2", "qp.time_limit=10",
            "qp.redundancy_rule=reference", "finetune.epochs=2", "finetune.batch_size=4",
            "finetune.optimizer=schedulefree_adamw", "finetune.schedule=constant", "evaluate.map_images=null",
            "runtime.device=cpu", "runtime.precision=fp32", "runtime.progress=false",
            f"runtime.output_dir={tmp / 'runs'}", f"cache.root={tmp / 'cache'}"]


def test_cub_generated_archive_end_to_end(tmp_path: Path) -> None:
    parent = make_cub(tmp_path / "data")
    cfg = load_config(REPO / "configs" / "cub.yaml",
                      _tiny_overrides(tmp_path, "cub", parent) + ["data.mask_resize=bilinear"])
    result = run_pipeline(cfg, preset="cub")
    m = json.loads((result.run_dir / "metrics.json").read_text())
    ev = m["evaluation"]
    assert ev["test_images"] == 6 and ev["map_images"] == 6  # whole test set
    assert ev["train_images"] + ev["val_images"] == 12 and ev["val_images"] >= 1  # the validation rows held out
    assert ev["masks"] and ev["structural_grounding"] == "cub class attributes"
    for name in ("linear_probe", "linear_probe_dinov2", "dense", "dino_qpm"):
        assert 0.0 <= m[name]["val"]["accuracy"] <= 1.0 and 0.0 <= m[name]["test"]["accuracy"] <= 1.0
    assert m["linear_probe_dinov2"]["n_blocks"] in (1, 2)  # a depth-2 backbone offers at most 2 blocks
    assert isinstance(m["dino_qpm"]["test"]["plausibility"], float)
    # Structural Grounding of the QPM head, recomputed from its checkpoint and the attribute file.
    model, _ = load_checkpoint(result.run_dir / "checkpoint")
    cont = np.loadtxt(parent / "CUB_200_2011" / "attributes" / "class_attribute_labels_continuous.txt")
    w = model.head_weight().detach().numpy()
    grounding = structural_grounding(w, class_attributes=cont)
    assert m["dino_qpm"]["test"]["structural_grounding"] == pytest.approx(grounding)
    # Tokens were made with the reference preprocessing: CUB statistics, bilinear resize.
    store = TokenStore(Path(result.stages["tokens_train"]["directory"]), "")
    assert store.meta["mean"] == [0.4853, 0.4964, 0.4295] and store.meta["interpolation"] == "bilinear"
    assert store.masks is not None and store.masks.shape == (12, 4, 4)
    assert store.cls_blocks is not None and store.cls_blocks.shape == (12, 2, 64)
    assert np.allclose(store.cls_blocks[:, -1], store.cls, atol=1e-3)  # the last block's CLS is the cached CLS
    report = (result.run_dir / "report.md").read_text()
    assert "linear probe (DINOv2 protocol)" in report and "struct. grounding" in report


def test_cars_generated_archive_end_to_end(tmp_path: Path) -> None:
    root = make_cars(tmp_path / "cars")
    cfg = load_config(REPO / "configs" / "cars.yaml", _tiny_overrides(tmp_path, "cars", root))
    result = run_pipeline(cfg, preset="cars")
    m = json.loads((result.run_dir / "metrics.json").read_text())
    ev = m["evaluation"]
    assert ev["test_images"] == 6 and ev["train_images"] + ev["val_images"] == 12
    assert not m["evaluation"]["masks"] and m["evaluation"]["structural_grounding"] is None
    assert m["dino_qpm"]["test"]["plausibility"] is None and m["dino_qpm"]["test"]["structural_grounding"] is None
    assert 0.0 <= m["linear_probe_dinov2"]["test"]["accuracy"] <= 1.0
    store = TokenStore(Path(result.stages["tokens_test"]["directory"]), "")
    assert store.meta["mean"] == [0.4593, 0.4466, 0.4453]
    assert store.meta["ids"][:3] == ["cars_test/00001.jpg", "cars_test/00002.jpg", "cars_test/00003.jpg"]
    assert store.labels[:3].tolist() == [2, 0, 1]  # 1-based classes in the .mat


@pytest.mark.parametrize("preset", ["cub", "cars"])
def test_paper_presets_resolve(preset: str) -> None:
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    assert cfg.backbone.name.startswith("vit_base_patch14_reg4_dinov2") and cfg.data.image_size == 224
    assert cfg.runtime.precision == "fp32" and cfg.qp.redundancy_rule == "reference"
    assert cfg.evaluate.map_images is None and cfg.data.preprocess == "reference"
    for stage in (cfg.dense, cfg.finetune, cfg.probe):
        assert stage.optimizer == "schedulefree_adamw" and stage.schedule == "constant"
    assert (cfg.dense.epochs, cfg.dense.batch_size, cfg.dense.lr, cfg.dense.weight_decay) == (25, 32, 1e-3, 7e-4)
    assert (cfg.finetune.epochs, cfg.finetune.batch_size, cfg.finetune.lr, cfg.finetune.weight_decay) == (
        25, 16, 5e-3, 8e-4)


# --------------------------------------------------------------------------------------------- DINOv2 probe


def _write_store(d: Path, blocks: np.ndarray, pmean: np.ndarray, labels: np.ndarray) -> TokenStore:
    d.mkdir(parents=True)
    np.save(d / "cls_blocks.npy", blocks.astype(np.float16))
    np.save(d / "patch_mean.npy", pmean.astype(np.float32))
    np.save(d / "cls.npy", blocks[:, -1].astype(np.float16))
    np.save(d / "labels.npy", labels.astype(np.int64))
    (d / "meta.json").write_text(json.dumps({"classes": ["a", "b", "c"], "grid": [1, 1]}))
    Manifest(stage="tokens", key=d.name, config={}, files=describe_files(d)).write(d)  # as a published store has
    return TokenStore(d, d.name)


def test_dinov2_probe_picks_the_block_that_carries_the_signal(tmp_path: Path) -> None:
    """Only the second-to-last block's CLS separates the classes: the protocol must choose n_blocks = 2 and reach
    high test accuracy, while every head on the last CLS alone stays near chance on the held-out share."""
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(3), n)
        blocks = rng.standard_normal((len(y), 2, 8))
        blocks[:, 0, :3] += 3.0 * np.eye(3)[y]
        return blocks, rng.standard_normal((len(y), 8)), y

    train = _write_store(tmp_path / "train", *split(60))
    test = _write_store(tmp_path / "test", *split(30))
    ctx = TrainContext(console=Console(enabled=False), device=torch.device("cpu"), seed=0, grad_accum=1,
                       make_engine=None)  # type: ignore[arg-type]
    cfg = ProbeDinov2Config(epochs=20, batch_size=32, n_blocks=[1, 2], lrs=[1e-2, 1.0])
    data = DataConfig(val_fraction=0.2)
    fit, val = holdout_views(train, holdout(train.labels, data.val_fraction, data.seed))  # the run's split
    directory, metrics = run_probe_dinov2(train=fit, val=val, test=test, cfg=cfg, data=data, ctx=ctx,
                                          root=tmp_path / "cache")
    assert metrics["n_blocks"] == 2 and metrics["test_accuracy"] > 0.9 and metrics["val_accuracy"] > 0.9
    grid = json.loads((directory / "selection.json").read_text())["grid"]
    last_only = [g["val_accuracy"] for g in grid if g["n_blocks"] == 1 and not g["avgpool"]]
    assert max(last_only) < 0.7
    assert json.loads((directory / "selection.json").read_text())["n_val"] == 36  # 20 % of 60 per class
    _, again = run_probe_dinov2(train=fit, val=val, test=test, cfg=cfg, data=data, ctx=ctx, root=tmp_path / "cache")
    assert again == metrics  # cached
    # Nothing held out (data.val_fraction=0): the probe chooses on its own share of train, then uses all of it.
    _, own = run_probe_dinov2(train=train, val=None, test=test, cfg=cfg, data=DataConfig(val_fraction=0), ctx=ctx,
                              root=tmp_path / "cache")
    assert own["val_accuracy"] is None and own["n_blocks"] == 2 and own["chosen_on"].startswith("its own")


def test_stratified_holdout_is_seeded_and_per_class() -> None:
    y = np.array([0] * 10 + [1] * 5 + [2] * 2)
    fit, val = stratified_holdout(y, 0.2, seed=3)
    assert np.bincount(y[val]).tolist() == [2, 1, 1] and len(fit) + len(val) == len(y)
    assert not set(fit) & set(val)
    assert stratified_holdout(y, 0.2, seed=3)[1].tolist() == val.tolist()


# --------------------------------------------------------------------------------------------- optimiser


def _sf_engine(seed: int = 0) -> tuple[torch.nn.Module, TorchEngine]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    cfg = DenseConfig(optimizer="schedulefree_adamw", schedule="constant", lr=0.05)
    return model, TorchEngine(module=model, cfg=cfg, total_steps=100, device=torch.device("cpu"))


def _steps(model: torch.nn.Module, engine: TorchEngine, start: int, stop: int) -> None:
    for i in range(start, stop):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        engine.backward(torch.nn.functional.cross_entropy(model(x), y))
        engine.step()


def test_schedule_free_modes_schedule_and_resume(tmp_path: Path) -> None:
    model, engine = _sf_engine()
    assert isinstance(engine.optimizer, schedulefree.AdamWScheduleFree)
    _steps(model, engine, 0, 6)
    assert engine.scheduler.get_last_lr() == [0.05]  # no schedule on top of the schedule-free method
    y = [p.detach().clone() for p in model.parameters()]
    set_optimizer_mode(engine, train=False)
    x = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(x, y))  # eval mode = the averaged weights
    set_optimizer_mode(engine, train=False)  # idempotent
    assert all(torch.equal(a, b) for a, b in zip(x, model.parameters()))
    set_optimizer_mode(engine, train=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(y, model.parameters()))
    # Resume: a checkpoint written in train mode mid-run continues to exactly the same averaged weights.
    engine.save(tmp_path / "ck", {"epoch": 0, "step": 6, "history": []})
    _steps(model, engine, 6, 12)
    set_optimizer_mode(engine, train=False)
    straight = [p.detach().clone() for p in model.parameters()]
    model2, engine2 = _sf_engine(seed=1)  # other initial weights: everything must come from the checkpoint
    engine2.load(tmp_path / "ck")
    _steps(model2, engine2, 6, 12)
    set_optimizer_mode(engine2, train=False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(straight, model2.parameters()))


def test_schedule_free_needs_a_constant_schedule() -> None:
    with pytest.raises(ConfigError, match="dense.schedule.*constant"):
        load_config(None, ["dense.optimizer=schedulefree_adamw"])
    assert load_config(None, ["dense.optimizer=schedulefree_adamw", "dense.schedule=constant"]).dense.lr == 1e-3


# --------------------------------------------------------------------------------------------- QP rule

# Hand-made similarity of 5 features (upper triangle); k = 3.
_R_UPPER = {(0, 1): 0.95, (0, 2): 0.5, (0, 3): 0.05, (0, 4): 0.6, (1, 2): 0.2, (1, 3): 0.1, (1, 4): 0.55,
            (2, 3): 0.15, (2, 4): -0.3, (3, 4): 0.25}


def _r(clip: bool) -> np.ndarray:
    r = np.zeros((5, 5))
    for (i, j), v in _R_UPPER.items():
        r[i, j] = r[j, i] = max(v, 0.0) if clip else v
    return r


def test_reference_rule_penalises_fewer_pairs_with_rescaled_penalty() -> None:
    """Single scale: the best triple {1, 2, 3} has max R 0.2, so tau = 0.25 (the next value of R) and every pair
    with R >= 0.25 is penalised by R: (0,1) (0,2) (0,4) (1,4) (3,4). Reference: the search runs on R + R^T = 2R, so
    its tau is 0.5 = 2 x 0.25, compared with R: only (0,1) (0,2) (0,4) (1,4); penalty (R - min nonzero R) /
    (max R - min nonzero R) with the negative R[2,4] = -0.3 kept: (R + 0.3) / 1.25 = 1.0, 0.64, 0.72, 0.68."""
    th = choose_tau(_r(clip=True), 3)
    single = build_problem(np.ones((5, 2)), _r(clip=True), k=3, m=1, tau=th.tau, w=1.0)
    assert th.tau == 0.25
    assert list(zip(single.pi.tolist(), single.pj.tolist())) == [(0, 1), (0, 2), (0, 4), (1, 4), (3, 4)]
    assert single.pw.tolist() == [0.95, 0.5, 0.6, 0.55, 0.25]
    ref = reference_pairs(_r(clip=False), 3)
    assert ref.tau == 0.5
    assert list(zip(ref.pi.tolist(), ref.pj.tolist())) == [(0, 1), (0, 2), (0, 4), (1, 4)]
    assert ref.penalty == pytest.approx([1.0, 0.64, 0.72, 0.68])
    assert sorted(ref.compatible.tolist()) == [1, 2, 3]  # the zero-penalty start


def test_solve_qp_and_cli_use_the_chosen_rule(tmp_path: Path) -> None:
    from toolkit.qp.__main__ import main
    from toolkit.qp.inputs import save_inputs

    rng = np.random.default_rng(0)
    A = rng.uniform(-1, 1, (5, 3))  # 3 classes x 1 feature can use all k = 3 selected features
    base = {"n_features": 3, "n_per_class": 1, "solver": "heuristic", "time_limit": 5.0}
    ref = solve_qp(A, _r(clip=False), QPConfig(**base, redundancy_rule="reference"))
    single = solve_qp(A, _r(clip=True), QPConfig(**base, redundancy_rule="clique"))
    assert (ref.stats["n_pairs"], ref.tau) == (4, 0.5) and (single.stats["n_pairs"], single.tau) == (5, 0.25)
    with pytest.raises(Exception, match="negative similarities.*reference"):
        solve_qp(A, _r(clip=False), QPConfig(**base, redundancy_rule="clique"))
    save_inputs(tmp_path / "x.npz", A, _r(clip=False))
    assert main(["--inputs", str(tmp_path / "x.npz"), "--n-features", "3", "--n-per-class", "1", "--solver",
                 "heuristic", "--redundancy-rule", "reference", "--out", str(tmp_path / "y.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "y.json").read_text())["tau"] == 0.5
    assert QPConfig().redundancy_rule == "reference"  # the default reproduces the paper (docs/reproducing.md)


# --------------------------------------------------------------------------------------------- loss ties


def test_diversity_loss_splits_the_gradient_of_tied_channels() -> None:
    """Two channels with identical maps and weights tie at every position: the reference's `amax` splits the
    gradient evenly between them (max would give all of it to the first); the loss value is the same either way."""
    from toolkit.train.losses import feature_diversity_loss

    base = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    maps = torch.stack([base, base, torch.zeros(2, 2)])[None].requires_grad_(True)  # (1, 3, 2, 2)
    features = torch.ones(1, 3)
    head = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    loss = feature_diversity_loss(maps, features, torch.tensor([[1.0, 0.0]]), head, beta=1.0)
    loss.backward()
    # omega = 1/sqrt(2) for both tied channels, a = 1; the spatial softmaxes sum to 1 over the 4 cells.
    assert loss.item() == pytest.approx(-1 / np.sqrt(2), rel=1e-4)
    g = maps.grad[0]
    assert torch.allclose(g[0], g[1]) and g[0].abs().sum() > 0 and g[2].abs().sum() == 0


def test_classes_sharing_no_attribute_give_grounding_na_with_its_reason_not_a_stopped_run(tmp_path: Path) -> None:
    """A CUB-layout dataset whose classes share no attribute: Structural Grounding has no ground truth to compare
    with. Every model trains, the run ends with its report, and the metric is n/a with its reason everywhere."""
    parent = make_cub(tmp_path / "data", per_class=(3, 1))
    cont = np.zeros((3, 12))
    for c in range(3):
        cont[c, 4 * c:4 * c + 4] = 50.0  # disjoint attribute sets: every class pair has similarity 0
    (parent / "CUB_200_2011" / "attributes" / "class_attribute_labels_continuous.txt").write_text(
        "".join(" ".join(f"{v:.1f}" for v in row) + "\n" for row in cont))
    cfg = load_config(REPO / "configs" / "cub.yaml", _tiny_overrides(tmp_path, "cub", parent)
                      + ["probe_dinov2.enabled=false", "dense.epochs=1", "finetune.epochs=1", "probe.epochs=1"])
    result = run_pipeline(cfg, preset="cub")
    m = json.loads((result.run_dir / "metrics.json").read_text())
    for name in ("linear_probe", "dense", "dino_qpm"):
        for split in ("val", "test"):
            sec = m[name][split]
            assert sec["structural_grounding"] is None
            assert "share no attribute" in sec["undefined"]["structural_grounding"]
            assert sec["accuracy"] is not None and sec["class_independence"] is not None  # the others are measured
    report = (result.run_dir / "report.md").read_text()
    assert "DINO-QPM (test): struct. grounding n/a: the chosen ground-truth similarities sum to ≤ 0" in report
    assert "share no attribute" in (result.run_dir / "report.html").read_text()
    log = (result.run_dir / "log.txt").read_text()
    assert "structural_grounding=n/a (the chosen ground-truth similarities sum to ≤ 0" in log
