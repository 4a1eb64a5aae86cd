"""Dataset readers behind `toolkit.data.load_dataset`: CUB, Stanford Cars, ImageFolder, Fashion-MNIST, synthetic.

Every reader returns an object with `classes`, `variant`, `root`, `ids`, `labels`, `__len__`, `__getitem__(i) ->
(PIL RGB image, label, bool (H, W) mask or None)` and `subset(indices)`. Files are opened lazily, in `__getitem__`,
so a missing or corrupt image fails with an error that names it when it is first read.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError
from scipy import io as sio
from scipy import ndimage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def _require(path: Path, hint: str = "") -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing dataset file {path}" + (f"; {hint}" if hint else ""))
    return path


def open_rgb(path: Path) -> Image.Image:
    """Open an image file as RGB, re-raising missing or unreadable files with their path."""
    if not path.is_file():
        raise FileNotFoundError(f"missing image file {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise OSError(f"cannot read image file {path}: {e}") from e


def open_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A mask PNG as bool (H, W) at `size` = (W, H) of its image; any value > 0 is object (soft CUB masks)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing mask file {path}")
    try:
        with Image.open(path) as im:
            m = im.convert("L")
            if m.size != size:  # masks live at image resolution; nearest keeps them binary
                m = m.resize(size, Image.NEAREST)
            return np.asarray(m) > 0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise OSError(f"cannot read mask file {path}: {e}") from e


class FileDataset:
    """Images (and optional masks) read from files; used for CUB, Cars and ImageFolder."""

    def __init__(self, *, variant: str, root: Path, classes: list[str], paths: Sequence[Path], labels: np.ndarray,
                 ids: Sequence[str], mask_paths: Sequence[Path | None] | None = None) -> None:
        self.variant, self.root, self.classes = variant, root, list(classes)
        self.paths, self.ids = list(paths), list(ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.mask_paths = list(mask_paths) if mask_paths is not None else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int, np.ndarray | None]:
        img = open_rgb(self.paths[i])
        mp = self.mask_paths[i]
        return img, int(self.labels[i]), (open_mask(mp, img.size) if mp is not None else None)

    def subset(self, idx: Sequence[int]) -> FileDataset:
        return FileDataset(variant=self.variant, root=self.root, classes=self.classes,
                           paths=[self.paths[i] for i in idx], labels=self.labels[np.asarray(idx, dtype=np.int64)],
                           ids=[self.ids[i] for i in idx], mask_paths=[self.mask_paths[i] for i in idx])


class ArrayDataset:
    """Grayscale uint8 images (N, H, W) held in memory; the mask is the exact silhouette (black background)."""

    def __init__(self, *, variant: str, root: Path, classes: list[str], images: np.ndarray, labels: np.ndarray,
                 ids: Sequence[str]) -> None:
        self.variant, self.root, self.classes = variant, root, list(classes)
        self.images, self.ids = images, list(ids)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int, np.ndarray]:
        x = self.images[i]
        # The background is exactly 0, so the filled support of the non-zero pixels is the true object
        # (docs/method.md#data).
        mask = ndimage.binary_fill_holes(x > 0)
        return Image.fromarray(x).convert("RGB"), int(self.labels[i]), mask

    def subset(self, idx: Sequence[int]) -> ArrayDataset:
        ix = np.asarray(idx, dtype=np.int64)
        return ArrayDataset(variant=self.variant, root=self.root, classes=self.classes, images=self.images[ix],
                            labels=self.labels[ix], ids=[self.ids[i] for i in ix])


# --------------------------------------------------------------------------------------------- CUB-200-2011


def _read_table(path: Path) -> list[list[str]]:
    return [ln.split(maxsplit=1) for ln in _require(path).read_text().splitlines() if ln.strip()]


def _cub_dir(root: Path) -> Path:
    """The folder holding images.txt: `root` itself or `root/CUB_200_2011` (where the images archive extracts)."""
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        return root / "CUB_200_2011"
    return root


def read_cub(root: Path, split: str) -> FileDataset:
    """CUB-200-2011 official layout; full images (no bbox crop), masks from `segmentations/` when present.

    The segmentations are a separate archive that extracts to `segmentations/` wherever it is unpacked: inside
    CUB_200_2011/ or beside it (the images archive's parent folder) are both found.
    """
    outer = root
    root = _cub_dir(root)
    rel = dict(_read_table(root / "images.txt"))
    cls_of = {k: int(v) for k, v in _read_table(root / "image_class_labels.txt")}
    is_train = {k: v.strip() == "1" for k, v in _read_table(root / "train_test_split.txt")}
    # "001.Black_footed_Albatross" -> "Black footed Albatross"
    classes = [re.sub(r"^\d+\.", "", name.strip()).replace("_", " ") for _, name in _read_table(root / "classes.txt")]
    keep = [k for k in sorted(rel, key=int) if is_train[k] == (split == "train")]
    seg = next((d for d in (root / "segmentations", outer / "segmentations", root.parent / "segmentations")
                if d.is_dir()), root / "segmentations")
    ids = [rel[k].strip() for k in keep]
    return FileDataset(
        variant="cub-full-images", root=root, classes=classes, ids=ids,
        paths=[root / "images" / r for r in ids], labels=np.array([cls_of[k] - 1 for k in keep]),
        mask_paths=[seg / Path(r).with_suffix(".png") for r in ids] if seg.is_dir() else None)


def read_cub_class_attributes(root: Path) -> np.ndarray | None:
    """CUB's per-class attribute vectors, (C, 312) float64 from `attributes/class_attribute_labels_continuous.txt`
    (percentages of images showing each attribute); None when the file is absent (Structural Grounding is then
    skipped).

    Raises:
        ValueError: the file's rows disagree with classes.txt or are not all the same length.
    """
    d = _cub_dir(root)
    path = d / "attributes" / "class_attribute_labels_continuous.txt"
    if not path.is_file():
        return None
    rows = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{path}: rows have different lengths; expected one row of attribute values per class")
    attrs = np.asarray(rows, dtype=np.float64)
    n_classes = len(_read_table(d / "classes.txt"))
    if attrs.shape[0] != n_classes:
        raise ValueError(f"{path}: {attrs.shape[0]} rows but classes.txt lists {n_classes} classes")
    return attrs


# --------------------------------------------------------------------------------------------- Stanford Cars


def _mat_strings(a: np.ndarray) -> list[str]:
    return [str(np.asarray(x).squeeze()) for x in np.atleast_1d(np.asarray(a, dtype=object).squeeze())]


def read_cars(root: Path, split: str) -> FileDataset:
    """Stanford Cars devkit layout; full images, no masks (the reference uses all-zero masks for Cars)."""
    meta = sio.loadmat(_require(root / "devkit" / "cars_meta.mat"), squeeze_me=True)
    classes = _mat_strings(meta["class_names"])
    if split == "train":
        annos_path, img_dir = root / "devkit" / "cars_train_annos.mat", root / "cars_train"
    else:
        annos_path, img_dir = root / "cars_test_annos_withlabels.mat", root / "cars_test"
        if not annos_path.is_file() and (root / "devkit" / annos_path.name).is_file():
            annos_path = root / "devkit" / annos_path.name
    _require(annos_path, "the test split needs the labelled annotations file cars_test_annos_withlabels.mat")
    annos = np.atleast_1d(sio.loadmat(annos_path, squeeze_me=True)["annotations"])
    fields = annos.dtype.names or ()
    key = "fname" if "fname" in fields else "relative_im_path"
    names = [Path(s).name for s in _mat_strings(annos[key])]
    labels = np.array([int(c) - 1 for c in np.atleast_1d(annos["class"])], dtype=np.int64)  # .mat is 1-based
    return FileDataset(variant="cars-full-images", root=root, classes=classes, labels=labels,
                       paths=[img_dir / n for n in names], ids=[f"{img_dir.name}/{n}" for n in names])


# --------------------------------------------------------------------------------------------- ImageFolder


def _class_dirs(d: Path) -> list[str]:
    if not d.is_dir():
        raise FileNotFoundError(f"missing dataset folder {d} (ImageFolder expects root/<split>/<class>/<image>)")
    return sorted(p.name for p in d.iterdir() if p.is_dir())


def read_imagefolder(root: Path, split: str, mask_root: Path | None) -> FileDataset:
    """root/<split>/<class>/*.jpg; class list from root/train so labels agree between splits."""
    classes = _class_dirs(root / "train")
    present = _class_dirs(root / split)
    extra = sorted(set(present) - set(classes))
    if extra:
        raise ValueError(f"{root / split} has classes missing from {root / 'train'}: {extra}")
    paths, labels = [], []
    for c, name in enumerate(classes):
        d = root / split / name
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if d.is_dir() else []
        paths += files
        labels += [c] * len(files)
    ids = [p.relative_to(root).as_posix() for p in paths]
    masks = [mask_root / split / p.parent.name / f"{p.stem}.png" for p in paths] if mask_root is not None else None
    return FileDataset(variant="imagefolder", root=root, classes=classes, paths=paths, labels=np.array(labels),
                       ids=ids, mask_paths=masks)


# --------------------------------------------------------------------------------------------- Fashion-MNIST


@lru_cache(maxsize=4)
def _read_idx(path: Path, mtime_ns: int) -> np.ndarray:
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise OSError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def _idx_file(root: Path, name: str) -> Path:
    for p in (root / f"{name}.gz", root / name):
        if p.is_file():
            return p
    raise FileNotFoundError(f"missing Fashion-MNIST file {root / name}.gz (or unzipped {name}); "
                            f"run `apt-get install dataset-fashion-mnist` or set data.root to a folder holding it")


def read_fashion_mnist(root: Path, split: str) -> ArrayDataset:
    """IDX files as shipped by Debian's dataset-fashion-mnist; test = t10k."""
    prefix = "train" if split == "train" else "t10k"
    xp, yp = _idx_file(root, f"{prefix}-images-idx3-ubyte"), _idx_file(root, f"{prefix}-labels-idx1-ubyte")
    x, y = _read_idx(xp, xp.stat().st_mtime_ns), _read_idx(yp, yp.stat().st_mtime_ns)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{xp} / {yp}: expected images (N, H, W) and labels (N,), got {x.shape} and {y.shape}")
    return ArrayDataset(variant="fashion-mnist-idx", root=root, classes=FASHION_MNIST_CLASSES, images=x, labels=y,
                        ids=[f"{split}:{i}" for i in range(len(y))])


# --------------------------------------------------------------------------------------------- synthetic

# Fixed palette so a sample's pixels depend only on (seed, split, label, k), never on num_classes.
_PALETTE = [(230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 220, 30), (220, 50, 220), (30, 220, 220),
            (250, 140, 20), (150, 80, 250), (255, 255, 255), (120, 200, 120), (160, 90, 40), (250, 150, 180)]
# Object centres as fractions of the image side: one region per class (cycled).
_SPOTS = [(0.3, 0.3), (0.7, 0.7), (0.7, 0.3), (0.3, 0.7), (0.5, 0.5), (0.5, 0.25), (0.25, 0.5), (0.75, 0.5),
          (0.5, 0.75)]


class SyntheticDataset:
    """Deterministic shapes on black: class c has its own colour, position, shape and (for odd c) stripes.

    Sample k of class c in `split` is drawn from the RNG seeded by (seed, split, c, k), so it never changes when
    other settings (number of classes, samples per class) do. The mask is the exact set of painted pixels.
    """

    def __init__(self, *, num_classes: int, per_class: int, seed: int, split: str, size: int = 56,
                 keys: Sequence[tuple[int, int]] | None = None) -> None:
        self.variant, self.root = f"synthetic-{size}px", None
        self.classes = [f"class_{c}" for c in range(num_classes)]
        self.seed, self.split, self.size = seed, split, size
        self.keys = list(keys) if keys is not None else [(c, k) for c in range(num_classes) for k in range(per_class)]
        self.labels = np.array([c for c, _ in self.keys], dtype=np.int64)
        self.ids = [f"{split}:s{seed}:c{c}:{k}" for c, k in self.keys]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[Image.Image, int, np.ndarray]:
        c, k = self.keys[i]
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, c, k])
        s = self.size
        fx, fy = _SPOTS[c % len(_SPOTS)]
        cx, cy = (np.array([fx, fy]) + rng.uniform(-0.06, 0.06, 2)) * s
        r = s * rng.uniform(0.14, 0.2)
        box = [cx - r, cy - r, cx + r, cy + r]
        mask_im = Image.new("L", (s, s), 0)
        draw = ImageDraw.Draw(mask_im)
        shape = c % 3
        if shape == 0:
            draw.ellipse(box, fill=255)
        elif shape == 1:
            draw.rectangle(box, fill=255)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
        mask = np.asarray(mask_im) > 0
        colour = np.array(_PALETTE[c % len(_PALETTE)], dtype=np.float32) * rng.uniform(0.8, 1.0)
        img = np.zeros((s, s, 3), dtype=np.float32)
        img[mask] = colour
        if c % 2 == 1:  # texture: darker horizontal stripes inside the object
            rows = (np.arange(s) // 3) % 2 == 0
            img[rows[:, None] & mask] *= 0.5
        return Image.fromarray(img.clip(0, 255).astype(np.uint8)), c, mask

    def subset(self, idx: Sequence[int]) -> SyntheticDataset:
        return SyntheticDataset(num_classes=len(self.classes), per_class=0, seed=self.seed, split=self.split,
                                size=self.size, keys=[self.keys[i] for i in idx])
