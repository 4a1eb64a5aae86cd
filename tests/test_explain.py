"""Explanation views on a tiny hand-made QPM model: additivity, global JSON, contrast picks, PNG validity, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.explain import (
    check_additivity,
    contrast_explanation,
    contrast_figure_px,
    explain_tokens,
    global_explanation,
    global_figure_px,
    local_figure_px,
    pick_pair,
    render_contrast,
    render_global,
    render_local,
    seriate,
)
from toolkit.explain.cli import main as explain_main
from toolkit.model import DinoQPM, SparseHead
from toolkit.model.adapter import TokenMLP

D, F, GRID = 6, 8, (3, 3)
P = GRID[0] * GRID[1]
CLASSES = ["cat", "dog", "fox", "owl"]
# m = 3 per class. Pairs (cat, dog) and (fox, owl) each share 2 features; the others share at most 1.
W = np.array([[1, 1, 1, 0, 0, 0],
              [1, 1, 0, 1, 0, 0],
              [0, 0, 0, 1, 1, 1],
              [0, 0, 1, 0, 1, 1]])


def _model() -> DinoQPM:
    torch.manual_seed(0)
    adapter = TokenMLP(in_dim=D, hidden_dim=10, out_dim=F, n_layers=2)
    head = SparseHead(selection=torch.tensor([7, 0, 3, 5, 1, 2]), weight=torch.tensor(W, dtype=torch.float32),
                      mean=torch.linspace(-0.2, 0.3, 6), std=torch.linspace(0.5, 1.5, 6))
    return DinoQPM(adapter=adapter, head=head, grid=GRID).eval()


def _tokens(b: int = 5) -> torch.Tensor:
    return torch.randn(b, P + 1, D, generator=torch.Generator().manual_seed(1))


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (42, 42, 3), dtype=np.uint8))


def test_local_contributions_sum_to_the_logit_and_render(tmp_path: Path) -> None:
    model, tokens = _model(), _tokens()
    with torch.no_grad():
        logits, _, maps = model(tokens)
    expls = explain_tokens(model, tokens, classes=CLASSES, images=[f"img{i}.png" for i in range(5)],
                           labels=[0, 1, 2, 3, 0])
    for b, e in enumerate(expls):
        assert e.predicted == int(logits[b].argmax())
        assert e.logit == pytest.approx(float(logits[b, e.predicted]))
        assert e.contribution_sum == pytest.approx(e.logit, abs=1e-5)
        used = sorted(f.feature for f in e.features)
        assert used == np.flatnonzero(W[e.predicted]).tolist()
        contribs = [f.contribution for f in e.features]
        assert contribs == sorted(contribs, reverse=True)
        for f, grid_map in zip(e.features, e.maps):  # maps are the ones the model pooled, column by column
            assert np.allclose(grid_map, maps[b, f.feature].numpy())
            assert f.activation == pytest.approx(float(np.mean(grid_map)), abs=1e-6)
            assert f.contribution == pytest.approx((f.activation - f.mean) / f.std, abs=1e-5)
        assert e.runner_up != e.predicted and e.runner_up_logit <= e.logit
    json.dumps(expls[0].to_dict())  # JSON-able as is
    path = render_local(expls[0], _image(), tmp_path / "local.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == local_figure_px(3)


def test_additivity_check_catches_a_wrong_sum() -> None:
    check_additivity(torch.tensor([1.0, -0.5, 2.0]), torch.tensor(2.5), what="ok")
    with pytest.raises(AssertionError, match="contributions sum"):
        check_additivity(torch.tensor([1.0, -0.5, 2.0]), torch.tensor(2.6), what="bad")


def test_local_explanations_need_the_sparse_head() -> None:
    from toolkit.model import DenseHead

    dense = DinoQPM(adapter=TokenMLP(in_dim=D, hidden_dim=10, out_dim=F, n_layers=2),
                    head=DenseHead(n_features=F, n_classes=4, dropout=0.0), grid=GRID)
    with pytest.raises(ValueError, match="sparse head"):
        explain_tokens(dense, _tokens(1), classes=CLASSES, images=["x"])


def test_global_json_matches_w_and_render(tmp_path: Path) -> None:
    expl = global_explanation(torch.tensor(W, dtype=torch.float32), CLASSES, selection=[7, 0, 3, 5, 1, 2])
    d = json.loads(json.dumps(expl.to_dict()))
    assert np.array_equal(np.asarray(d["weight"]), W)
    assert all(sum(row) == 3 for row in d["weight"]) and d["n_per_class"] == 3
    assert d["assignment"]["owl"] == [2, 4, 5]
    assert d["degree"] == W.sum(0).tolist()
    assert sorted(d["class_order"]) == [0, 1, 2, 3] and sorted(d["feature_order"]) == list(range(6))
    assert {tuple(p["indices"]) for p in d["shared_pairs"][:2]} == {(0, 1), (2, 3)}
    path = render_global(expl, tmp_path / "global.png")
    with Image.open(path) as im:
        assert im.size == global_figure_px(expl)
    with pytest.raises(ValueError, match="same number"):
        global_explanation(np.array([[1, 1, 0], [0, 0, 1]]), ["a", "b"])


def test_seriation_puts_classes_that_share_features_next_to_each_other() -> None:
    # Classes 0 and 2 share features {0, 1}; 1 and 3 share {2, 3}: interleaved in index order.
    w = np.zeros((4, 8), dtype=int)
    for c, feats in enumerate([(0, 1, 4), (2, 3, 5), (0, 1, 6), (2, 3, 7)]):
        w[c, list(feats)] = 1
    rows, cols = seriate(w)
    pos = {c: i for i, c in enumerate(rows)}
    assert abs(pos[0] - pos[2]) == 1 and abs(pos[1] - pos[3]) == 1
    # Features are grouped by the first class using them: the two shared by the first class come first.
    assert set(cols[:2]) == set(np.flatnonzero(w[rows[0]] & w[rows[1]]))


def test_contrast_picks_shared_and_distinguishing_features(tmp_path: Path) -> None:
    a, b, reason = pick_pair(W)
    assert (a, b) == (0, 1) and "2 of 3" in reason  # tie with (2, 3), lowest indices win without confusion
    confusion = np.zeros((4, 4), dtype=int)
    confusion[3, 2] = 4
    assert pick_pair(W, confusion)[:2] == (2, 3)  # the confused pair wins the tie

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2, 3], 3)
    feats = rng.normal(size=(12, 6))
    feats[4, 3] = 10.0  # dog sample 4 is where dog's own feature 3 is strongest
    maps = rng.normal(size=(12, 6, *GRID))
    asked: list[list[int]] = []

    def maps_of(idx: list[int]) -> np.ndarray:
        asked.append(list(idx))
        return maps[idx]

    expl = contrast_explanation(W, CLASSES, features=feats, labels=labels, maps_of=maps_of,
                                ids=[f"s{i}" for i in range(12)])
    assert (expl.class_a, expl.class_b) == (0, 1)
    assert expl.shared == [0, 1] and expl.only_a == [2] and expl.only_b == [3]
    assert expl.columns == [2, 0, 1, 3]
    ex = expl.example(3, 1)
    assert ex is not None and ex.sample == 4 and ex.image == "s4" and ex.activation == 10.0
    assert np.allclose(ex.map, maps[4, 3])
    best_cat = 3 * 0 + int(np.argmax(feats[0:3, 2]))
    assert expl.example(2, 0).sample == best_cat
    assert len(asked) == 1  # maps are fetched once, for the chosen samples only
    json.dumps(expl.to_dict())
    path = render_contrast(expl, lambda s: _image(s), tmp_path / "contrast.png")
    with Image.open(path) as im:
        assert im.size == contrast_figure_px(4)
    explicit = contrast_explanation(W, CLASSES, a=2, b=3)
    assert explicit.shared == [4, 5] and explicit.only_a == [3] and explicit.only_b == [2]
    assert explicit.examples == []
    with pytest.raises(ValueError, match="two different classes"):
        contrast_explanation(W, CLASSES, a=1, b=1)


def test_cli_rejects_missing_and_corrupt_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    run = tmp_path / "run"
    assert explain_main(["--run", str(run), "--images", str(tmp_path / "nope.jpg"), "--out", str(tmp_path)]) == 2
    assert "nope.jpg does not exist" in capsys.readouterr().err
    assert explain_main(["--run", str(run), "--images", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "broken.png" in capsys.readouterr().err
    good = tmp_path / "good.png"
    _image().save(good)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "good.png").write_bytes(b"keep me")
    assert explain_main(["--run", str(run), "--images", str(good), "--out", str(tmp_path / "o")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "o" / "good.png").read_bytes() == b"keep me"


# ------------------------------------------------------------------------------------------- atlas, report helpers


def test_global_view_counts_the_features_really_used() -> None:
    w = np.array([[1, 1, 0, 0], [0, 1, 1, 0]])  # column 3 is selected but no class uses it
    expl = global_explanation(w, ["a", "b"])
    assert expl.n_used == 3 and expl.to_dict()["n_used"] == 3


def test_atlas_top_samples_and_class_quantiles() -> None:
    from toolkit.explain.atlas import class_quantiles, top_samples

    f = np.array([[0.1, 5.0], [0.9, 1.0], [0.5, 1.0], [0.9, 0.0]])
    # Strongest first per column; ties keep the lower index first.
    assert top_samples(f, 3).tolist() == [[1, 3, 2], [0, 1, 2]]
    assert top_samples(f, 10).shape == (2, 4)
    q = class_quantiles(np.array([1.0, 2.0, 3.0, 10.0]), np.array([0, 0, 0, 2]), 3)
    assert q[0]["q50"] == 2.0 and q[0]["mean"] == 2.0 and q[0]["q5"] == pytest.approx(1.1)
    assert q[1] == {} and q[2]["q95"] == 10.0


def test_atlas_strip_shares_one_colour_range(tmp_path: Path) -> None:
    """The strongest example is drawn hotter than a weaker one, because the tiles of one feature share a range."""
    from toolkit.explain.atlas import TILE_PX, Atlas, AtlasExample, FeatureCard, render_atlas

    grid = np.zeros((1, 3, 3), np.float32)
    strong, weak = grid.copy(), grid.copy()
    strong[0, 1, 1], weak[0, 1, 1] = 4.0, 1.0
    examples = [AtlasExample(sample=s, image=f"id{s}", label=0, label_name="cat", activation=a)
                for s, a in ((7, 4.0 / 9), (3, 1.0 / 9))]
    card = FeatureCard(feature=0, channel=5, used_by=[0], used_by_names=["cat"], weights=[1.0], mean=0.0, std=1.0,
                       examples=examples, per_class=[{}], png="atlas/f0.png")
    atlas = Atlas(classes=["cat"], split="train", n_images=10, top_n=2, quantiles=[0.5], features=[card])
    grey = Image.new("RGB", (20, 20), (128, 128, 128))
    (path,) = render_atlas(atlas, {7: strong, 3: weak}, lambda i: grey, tmp_path)
    with Image.open(path) as im:
        assert im.size == (2 * TILE_PX + 4, TILE_PX)
        arr = np.asarray(im.convert("RGB")).astype(int)
    centre = TILE_PX // 2
    first, second = arr[centre, centre], arr[centre, TILE_PX + 4 + centre]
    assert abs(first - 128).sum() > abs(second - 128).sum() + 50  # the weak tile stays closer to the grey image


def test_metric_labels_say_which_direction_is_better() -> None:
    from toolkit.explain.report import METRIC_INFO, metric_label
    from toolkit.metrics import REPORTED

    for key, label in REPORTED:
        assert key in METRIC_INFO, f"{key} has no definition"
        better, what = METRIC_INFO[key]
        assert better in ("higher", "lower") and len(what) > 20
        assert metric_label(key, label).endswith(f"({better} = better)")
    assert METRIC_INFO["correlation"][0] == "lower"


def test_most_confused_and_gallery_picks() -> None:
    from toolkit.explain.report import most_confused, pick_gallery

    confusion = np.array([[5, 3, 0], [1, 6, 0], [0, 0, 4]])
    weight = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]])
    assert most_confused(confusion, weight, 0) == (1, 4)
    # Class 2 is never confused: the tie is broken by shared features (class 0 and 1 share one each) then index.
    assert most_confused(confusion, weight, 2) == (0, 0)
    logits = np.array([[3.0, 0.0], [9.0, 0.0], [0.0, 2.0], [5.0, 0.0], [0.0, 8.0], [0.0, 1.0]])
    labels = np.array([0, 0, 1, 1, 1, 0])
    correct, wrong = pick_gallery(logits, labels, n=2)
    assert correct == [1, 4]  # one per class first, most confident first
    assert wrong == [3, 5]  # most confident mistakes first


def test_line_and_box_charts_are_svg() -> None:
    from toolkit.explain.html import box_chart, line_chart

    svg = line_chart({"loss": [1.0, 0.5, 0.25]}, title="dense: loss")
    assert svg.startswith("<svg") and svg.count("<polyline") == 1 and "dense: loss" in svg
    assert line_chart({"loss": []}, title="x") == ""
    per_class = [{"q5": 0.0, "q25": 1.0, "q50": 2.0, "q75": 3.0, "q95": 4.0, "mean": 2.0}, {}]
    box = box_chart(per_class, ["a", "b"], [0])
    assert box.count("<rect") == 1 and "#c0392b" in box  # the user class is drawn, in red; the empty one is not
