"""Dataset readers on tiny on-the-fly fixtures in each dataset's real layout, plus transforms and masks."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import torch
from PIL import Image

from toolkit.config import DataConfig
from toolkit.data import (
    FASHION_MNIST_CLASSES,
    balanced_subset,
    describe,
    load_dataset,
    make_transform,
    mask_to_grid,
    preprocess_for,
    read_cub_class_attributes,
)


def _save_rgb(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


# --------------------------------------------------------------------------------------------- CUB


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    root = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    images, labels, split = [], [], []
    for i in range(6):
        c = i % 2
        rel = f"{classes[c]}/{classes[c][4:]}_{i:04d}_1.jpg"
        _save_rgb(root / "images" / rel, i)
        seg = np.zeros((30, 40), dtype=np.uint8)
        seg[5:10, 5:20] = 255
        seg[20, 30] = 1  # soft border value: still object (threshold > 0, like the reference)
        (root / "segmentations" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(seg).save((root / "segmentations" / rel).with_suffix(".png"))
        images.append(f"{i + 1} {rel}")
        labels.append(f"{i + 1} {c + 1}")
        split.append(f"{i + 1} {int(i < 4)}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("".join(f"{k + 1} {c}\n" for k, c in enumerate(classes)))
    return tmp_path  # the parent: the reader must find CUB_200_2011/ inside it


def test_cub_splits_labels_masks(cub_root: Path) -> None:
    train = load_dataset(DataConfig(dataset="cub", root=str(cub_root)), "train")
    test = load_dataset(DataConfig(dataset="cub", root=str(cub_root)), "test")
    assert train.classes == ["Black footed Albatross", "Laysan Albatross"]
    assert train.variant == "cub-full-images"
    assert len(train) == 4 and len(test) == 2
    assert train.labels.tolist() == [0, 1, 0, 1] and test.labels.dtype == np.int64
    assert train.ids[1] == "002.Laysan_Albatross/Laysan_Albatross_0001_1.jpg"
    img, label, mask = train[1]
    assert img.mode == "RGB" and img.size == (40, 30) and label == 1
    assert mask.dtype == bool and mask.shape == (30, 40)
    assert mask.sum() == 5 * 15 + 1 and mask[20, 30]


def test_cub_missing_and_corrupt_image_name_the_file(cub_root: Path) -> None:
    ds = load_dataset(DataConfig(dataset="cub", root=str(cub_root)), "train")
    ds.paths[0].unlink()
    with pytest.raises(FileNotFoundError, match=ds.paths[0].name):
        ds[0]
    ds.paths[1].write_bytes(b"not a jpeg at all")
    with pytest.raises(OSError, match=ds.paths[1].name):
        ds[1]
    (cub_root / "CUB_200_2011" / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        load_dataset(DataConfig(dataset="cub", root=str(cub_root)), "train")


# --------------------------------------------------------------------------------------------- Cars


def _annos(rows: list[tuple[int, str]]) -> np.ndarray:
    # Same struct layout as the devkit: a 1xN struct array, every field a 1x1 matrix.
    dt = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    a = np.empty((1, len(rows)), dtype=dt)
    for j, (cls, fname) in enumerate(rows):
        a[0, j] = (np.array([[1]]), np.array([[2]]), np.array([[30]]), np.array([[20]]), np.array([[cls]]), fname)
    return a


def test_cars_devkit_layout(tmp_path: Path) -> None:
    (tmp_path / "devkit").mkdir()
    names = np.empty((1, 3), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    sio.savemat(tmp_path / "devkit" / "cars_meta.mat", {"class_names": names})
    train_rows = [(3, "00001.jpg"), (1, "00002.jpg"), (2, "00003.jpg")]
    sio.savemat(tmp_path / "devkit" / "cars_train_annos.mat", {"annotations": _annos(train_rows)})
    sio.savemat(tmp_path / "cars_test_annos_withlabels.mat", {"annotations": _annos([(2, "00001.jpg")])})
    for k, (_, f) in enumerate(train_rows):
        _save_rgb(tmp_path / "cars_train" / f, k)
    _save_rgb(tmp_path / "cars_test" / "00001.jpg", 9)
    cfg = DataConfig(dataset="cars", root=str(tmp_path))
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert train.classes[2] == "Audi R8 Coupe 2012" and len(train.classes) == 3
    assert train.labels.tolist() == [2, 0, 1]  # 1-based in the .mat
    assert test.labels.tolist() == [1] and test.ids == ["cars_test/00001.jpg"]
    img, label, mask = test[0]
    assert img.size == (40, 30) and label == 1 and mask is None
    (tmp_path / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(FileNotFoundError, match="cars_test_annos_withlabels.mat"):
        load_dataset(cfg, "test")


# --------------------------------------------------------------------------------------------- ImageFolder


def test_imagefolder_masks_and_subset(tmp_path: Path) -> None:
    root, masks = tmp_path / "data", tmp_path / "masks"
    for split, n in (("train", 3), ("test", 2)):
        for c in ("dog", "cat"):
            for k in range(n):
                _save_rgb(root / split / c / f"{c}{k}.jpg", k)
                m = np.zeros((30, 40), dtype=np.uint8)
                m[: k + 1] = 255
                (masks / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(m).save(masks / split / c / f"{c}{k}.png")
    (root / "train" / "cat" / "notes.txt").write_text("ignored: not an image")
    cfg = DataConfig(dataset="imagefolder", root=str(root), mask_root=str(masks))
    train = load_dataset(cfg, "train")
    assert train.classes == ["cat", "dog"] and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.ids[0] == "train/cat/cat0.jpg"
    _, _, mask = train[2]
    assert mask.shape == (30, 40) and mask.sum() == 3 * 40
    sub = load_dataset(DataConfig(dataset="imagefolder", root=str(root), test_per_class=1, seed=3), "test")
    assert np.bincount(sub.labels).tolist() == [1, 1] and sub[0][2] is None
    (root / "test" / "bird").mkdir()
    with pytest.raises(ValueError, match="bird"):
        load_dataset(cfg, "test")
    with pytest.raises(FileNotFoundError, match="dog0.png"):
        (masks / "train" / "dog" / "dog0.png").unlink()
        load_dataset(cfg, "train")[3]


# --------------------------------------------------------------------------------------------- Fashion-MNIST


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)


@pytest.fixture
def fmnist_root(tmp_path: Path) -> Path:
    n_per = 6
    y = np.repeat(np.arange(10), n_per)
    x = np.zeros((len(y), 28, 28), dtype=np.uint8)
    for i, c in enumerate(y):
        x[i, 4:20, 4 + c: 20 + c // 2] = 50 + i  # a ring: the filled mask must include its hole
        x[i, 8:16, 8 + c: 16 + c // 2] = 0
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", x, gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y, gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", x[::2], gz=False)  # plain files are accepted too
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", y[::2], gz=False)
    return tmp_path


def test_fashion_mnist_idx_parsing_and_masks(fmnist_root: Path) -> None:
    ds = load_dataset(DataConfig(dataset="fashion_mnist", root=str(fmnist_root)), "train")
    assert ds.classes == FASHION_MNIST_CLASSES and ds.variant == "fashion-mnist-idx"
    assert len(ds) == 60 and ds.ids[7] == "train:7" and ds.labels[7] == 1
    img, label, mask = ds[7]
    assert img.mode == "RGB" and img.size == (28, 28) and label == 1
    px = np.asarray(img)
    assert (px[..., 0] == px[..., 1]).all() and px[5, 6, 0] == 57
    assert mask[10, 10] and not px[10, 10].any()  # the hole is filled
    expected = np.zeros((28, 28), dtype=bool)
    expected[4:20, 5:20] = True  # the ring's outer rectangle for class 1
    assert np.array_equal(mask, expected)
    test = load_dataset(DataConfig(dataset="fashion_mnist", root=str(fmnist_root)), "test")
    assert len(test) == 30 and test.ids[1] == "test:1"


def test_fashion_mnist_balanced_seeded_subsets(fmnist_root: Path) -> None:
    def ids(seed: int) -> list[str]:
        return load_dataset(DataConfig(dataset="fashion_mnist", root=str(fmnist_root), train_per_class=2,
                                       seed=seed), "train").ids

    ds = load_dataset(DataConfig(dataset="fashion_mnist", root=str(fmnist_root), train_per_class=2), "train")
    assert np.bincount(ds.labels).tolist() == [2] * 10
    assert ids(0) == ids(0) and ids(0) != ids(1)
    # per_class above the class size keeps the whole class
    assert len(balanced_subset(np.array([0, 0, 1]), 5, seed=0)) == 3


def test_fashion_mnist_missing_file_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(dataset="fashion_mnist", root=str(tmp_path)), "train")


def test_fashion_mnist_real_debian_files(fashion_mnist_root: Path) -> None:
    ds = load_dataset(DataConfig(dataset="fashion_mnist", root=str(fashion_mnist_root), test_per_class=3, seed=5),
                      "test")
    assert len(ds) == 30 and np.bincount(ds.labels).tolist() == [3] * 10
    assert all(i.startswith("test:") for i in ds.ids)
    img, label, mask = ds[0]
    assert img.size == (28, 28) and 0 < mask.mean() < 1
    assert (np.asarray(img)[..., 0] > 0)[~mask].sum() == 0  # every non-black pixel is inside the silhouette


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_separable() -> None:
    cfg = DataConfig(dataset="synthetic", num_classes=4, synthetic_size=5, seed=1)
    a, b = load_dataset(cfg, "train"), load_dataset(cfg, "train")
    assert len(a) == 20 and a.ids == b.ids and np.bincount(a.labels).tolist() == [5] * 4
    for i in (0, 13):
        (ia, la, ma), (ib, lb, mb) = a[i], b[i]
        assert np.array_equal(np.asarray(ia), np.asarray(ib)) and la == lb and np.array_equal(ma, mb)
        assert np.array_equal(np.asarray(ia).any(-1), ma)  # the mask is exactly the painted pixels
    other = load_dataset(DataConfig(dataset="synthetic", num_classes=4, synthetic_size=5, seed=2), "train")
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(other[0][0]))
    test = load_dataset(cfg, "test")
    assert set(test.ids).isdisjoint(a.ids)

    # classes are clearly different: nearest centroid on 8x8 thumbnails gets every test image right
    def feats(ds) -> np.ndarray:  # noqa: ANN001
        return np.stack([np.asarray(ds[i][0].resize((8, 8), Image.BOX), np.float32).ravel() for i in range(len(ds))])

    ftr, fte = feats(a), feats(test)
    cent = np.stack([ftr[a.labels == c].mean(0) for c in range(4)])
    pred = ((fte[:, None] - cent[None]) ** 2).sum(-1).argmin(1)
    assert (pred == test.labels).all()
    sub = load_dataset(DataConfig(dataset="synthetic", num_classes=4, synthetic_size=5, train_per_class=2, seed=1),
                       "train")
    assert np.bincount(sub.labels).tolist() == [2] * 4 and set(sub.ids) <= set(a.ids)
    j = a.ids.index(sub.ids[3])
    assert np.array_equal(np.asarray(sub[3][0]), np.asarray(a[j][0]))


# --------------------------------------------------------------------------------------------- transforms, masks


def test_transform_shape_normalisation_and_minmax() -> None:
    grey = Image.new("RGB", (30, 50), (128, 128, 128))
    t = make_transform(image_size=28, mean=(128 / 255,) * 3, std=(0.25,) * 3, reference_minmax=False)
    x = t(grey)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and x.abs().max() < 1e-5
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8))
    y = make_transform(image_size=28, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))(noisy)
    assert y.min() < -1.5 and y.max() > 1.5  # ImageNet-standardised, not [0, 1]
    z = make_transform(image_size=28, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                       reference_minmax=True)(noisy)
    assert z.min() == 0.0 and z.max() == 1.0
    assert torch.allclose(z, (y - y.min()) / (y.max() - y.min()), atol=1e-6)


def test_mask_to_grid() -> None:
    m = np.zeros((56, 56), dtype=bool)
    m[30, 3] = True  # a single object pixel marks its whole cell (area > 0)
    g = mask_to_grid(m, (4, 4))
    assert g.dtype == np.float32 and g.shape == (4, 4)
    assert g[2, 0] == 1.0 and g.sum() == 1.0
    assert mask_to_grid(np.ones((28, 42), dtype=np.uint8), (2, 3)).sum() == 6
    assert not mask_to_grid(None, (3, 5)).any() and mask_to_grid(None, (3, 5)).shape == (3, 5)
    with pytest.raises(ValueError):
        mask_to_grid(np.zeros((2, 2, 3)), (2, 2))


def test_describe() -> None:
    ds = load_dataset(DataConfig(dataset="synthetic", num_classes=3, synthetic_size=2), "test")
    d = describe(ds)
    assert d["n"] == 6 and d["n_classes"] == 3 and d["per_class"] == [2, 2, 2] and d["variant"].startswith("synth")


# --------------------------------------------------------------------------------------------- reference options


def test_reference_resize_is_bilinear_hand_computed() -> None:
    """2 px -> 4 px, columns 0 and 255. PIL bilinear (half-pixel centres, weights renormalised at the border):
    out1 samples at 0.75 -> 0.75 * 0 + 0.25 * 255 = 63.75 -> 64; out2 -> 191.25 -> 191. Bicubic overshoots (53, 202)."""
    im = Image.fromarray(np.array([[0, 255], [0, 255]], dtype=np.uint8)).convert("RGB")
    cfg = DataConfig(dataset="cub", root="unused", preprocess="reference")
    pre = preprocess_for(cfg, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert pre.interpolation == "bilinear" and pre.minmax
    plain = make_transform(image_size=4, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bilinear")(im)
    assert torch.allclose(plain[0, 0] * 255, torch.tensor([0.0, 64.0, 191.0, 255.0]))
    cubic = make_transform(image_size=4, mean=(0, 0, 0), std=(1, 1, 1))(im)
    assert torch.allclose(cubic[0, 0] * 255, torch.tensor([0.0, 53.0, 202.0, 255.0]))


def test_reference_statistics_then_minmax_hand_computed() -> None:
    """A black image with one white pixel, CUB statistics, then min-max over all channels jointly.

    Normalised black = -mean/std = (-2.1100, -2.1984, -1.6362); white = (1-mean)/std = (2.2378, 2.2303, 2.1733).
    min = -2.1984 (G, black), max = 2.2378 (R, white), so black R -> (-2.1100 + 2.1984) / 4.4362 = 0.019928,
    black B -> 0.126733, white G -> 0.998302, white B -> 0.985462.
    """
    arr = np.zeros((28, 28, 3), dtype=np.uint8)
    arr[0, 0] = 255
    im = Image.fromarray(arr)
    cub = preprocess_for(DataConfig(dataset="cub", root="unused", preprocess="reference"),
                         (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert cub.mean == (0.4853, 0.4964, 0.4295) and cub.std == (0.2300, 0.2258, 0.2625)
    x = cub.transform(28)(im)
    assert x[:, 5, 5].tolist() == pytest.approx([0.019928, 0.0, 0.126733], abs=1e-5)
    assert x[:, 0, 0].tolist() == pytest.approx([1.0, 0.998302, 0.985462], abs=1e-5)
    # The old flag normalises with the backbone's ImageNet statistics before the min-max: other numbers.
    timm = preprocess_for(DataConfig(dataset="cub", root="unused", reference_minmax=True),
                          (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert timm.interpolation == "bicubic" and timm.minmax
    assert timm.transform(28)(im)[0, 5, 5] != pytest.approx(0.019928, abs=1e-3)
    # Cars has its own statistics; datasets without any keep the backbone's.
    cars = preprocess_for(DataConfig(dataset="cars", root="unused", preprocess="reference"), (0.1,) * 3, (0.2,) * 3)
    assert cars.mean == (0.4593, 0.4466, 0.4453)
    fm = preprocess_for(DataConfig(preprocess="reference"), (0.1,) * 3, (0.2,) * 3)
    assert fm.mean == (0.1,) * 3 and fm.minmax


def test_mask_bilinear_reads_two_pixels_per_cell() -> None:
    """28 px -> 2 cells (scale 14): cv2 INTER_LINEAR samples cell o at 14 o + 6.5, i.e. pixels 14 o + 6 and 14 o + 7
    (weight 1/2 each), so object pixels elsewhere in the cell are invisible to it; the box filter sees them all."""
    m = np.zeros((28, 28), dtype=bool)
    m[0:6, 0:6] = True  # top-left cell, away from its centre pixels
    assert mask_to_grid(m, (2, 2), "box").tolist() == [[1, 0], [0, 0]]
    assert mask_to_grid(m, (2, 2), "bilinear").tolist() == [[0, 0], [0, 0]]
    m = np.zeros((28, 28), dtype=bool)
    m[7, 21] = True  # row 7 is a centre tap of cell row 0, column 21 of cell column 1 (taps 20, 21)
    assert mask_to_grid(m, (2, 2), "bilinear").tolist() == [[0, 1], [0, 0]]
    m[27, 27] = True  # last pixel: not a tap of the last cell (20, 21)
    assert mask_to_grid(m, (2, 2), "bilinear").tolist() == [[0, 1], [0, 0]]
    assert mask_to_grid(m, (2, 2), "box").tolist() == [[0, 1], [0, 1]]
    # Upscaling clamps at the border like cv2: a 2 x 2 mask to 4 x 4 interpolates between the two pixels.
    small = np.array([[1, 0], [0, 0]], dtype=np.uint8)
    assert mask_to_grid(small, (4, 4), "bilinear").tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0],
                                                                [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="box.*bilinear"):
        mask_to_grid(m, (2, 2), "nearest")  # type: ignore[arg-type]


def test_cub_segmentations_beside_and_class_attributes(cub_root: Path) -> None:
    """segmentations.tgz is a separate archive: extracted next to CUB_200_2011/ it is still found. The class
    attributes (C, 312 in the real file) are read when present and checked against classes.txt."""
    root = cub_root / "CUB_200_2011"
    (root / "segmentations").rename(cub_root / "segmentations")
    train = load_dataset(DataConfig(dataset="cub", root=str(cub_root)), "train")
    assert train[0][2] is not None and train[0][2].any()
    assert read_cub_class_attributes(cub_root) is None  # no attributes/ folder: Structural Grounding is skipped
    (root / "attributes").mkdir()
    path = root / "attributes" / "class_attribute_labels_continuous.txt"
    path.write_text("1.5 0.0 98.25\n0.0 50.0 3.0\n")
    np.testing.assert_array_equal(read_cub_class_attributes(cub_root), [[1.5, 0.0, 98.25], [0.0, 50.0, 3.0]])
    path.write_text("1.5 0.0 98.25\n")
    with pytest.raises(ValueError, match="1 rows but classes.txt lists 2"):
        read_cub_class_attributes(cub_root)
