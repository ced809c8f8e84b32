"""Multi-label data: the embedded Fashion-MNIST mosaics, COCO (pycocotools) and VOC (XML) readers.

The embedded default is composed from real items: each image is a 2x2 mosaic of Fashion-MNIST
pictures (cells may stay empty) and its labels are the set of categories present. Items are drawn
from "scenes" (summer, winter, office, sport outfits), so category co-occurrence is structured as
in real photographs: some pairs are common, others rare. The mosaics are written as a COCO-style
dataset (PNG files + ``annotations/instances_<split>.json`` with one bounding box per item) and
read back through :func:`load_coco`, the same loader that reads real COCO 2014/2017; :func:`load_voc`
reads VOC2007/2012 annotations with the standard library. These are the formats mmdet reads, so a
user's mmdet-style dataset loads unchanged.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import write_json
from modalities.kit import FASHION_FILES, fashion_folder, read_idx

FASHION_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
VOC_NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
             "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
# Outfits: category -> weight within the scene. Pairs inside one scene co-occur often, pairs
# across scenes only through the 10 % of items drawn uniformly (rare combinations).
SCENES = [
    (0.30, {0: 3, 3: 3, 5: 3, 8: 2, 1: 1}),          # summer: t-shirt, dress, sandal, bag
    (0.30, {4: 3, 2: 3, 9: 3, 1: 2, 8: 1}),          # winter: coat, pullover, ankle boot
    (0.20, {6: 3, 1: 3, 8: 2, 9: 1, 2: 1, 7: 1}),    # office: shirt, trouser, bag
    (0.20, {0: 3, 7: 3, 1: 2, 8: 1, 2: 1}),          # sport: t-shirt, sneaker, trouser
]
CELL = 28


# --------------------------------------------------------------------------- Fashion-MNIST items
def load_fashion(cache_dir: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    folder = fashion_folder(Path(cache_dir))
    splits = {s: (read_idx(folder / a), read_idx(folder / b).astype(np.int64)) for s, (a, b) in FASHION_FILES.items()}
    return splits, f"Fashion-MNIST items (Debian dataset-fashion-mnist, {folder})"


def compose_mosaics(items: np.ndarray, labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, list[list[dict]]]:
    """``n`` 2x2 mosaics ``[n, 1, 56, 56]`` and, per mosaic, its objects ``{"category", "bbox"}``
    (COCO ``[x, y, w, h]`` around the item's non-zero pixels)."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    weights = np.array([w for w, _ in SCENES])
    images = np.zeros((n, 1, 2 * CELL, 2 * CELL), dtype=np.uint8)
    objects: list[list[dict]] = []
    for i in range(n):
        _, scene = SCENES[rng.choice(len(SCENES), p=weights / weights.sum())]
        cats, probs = np.array(list(scene)), np.array(list(scene.values()), dtype=float)
        count = rng.choice([1, 2, 3, 4], p=[0.1, 0.3, 0.35, 0.25])
        cells = rng.permutation(4)[:count]
        found = []
        for cell in cells:
            c = int(rng.integers(10)) if rng.random() < 0.1 else int(rng.choice(cats, p=probs / probs.sum()))
            item = items[rng.choice(by_class[c])]
            r0, c0 = CELL * (cell // 2), CELL * (cell % 2)
            images[i, 0, r0:r0 + CELL, c0:c0 + CELL] = item
            rows, cols = np.nonzero(item)
            box = ([c0 + int(cols.min()), r0 + int(rows.min()), int(cols.max() - cols.min() + 1),
                    int(rows.max() - rows.min() + 1)] if len(rows) else [c0, r0, CELL, CELL])
            found.append({"category": c, "bbox": box})
        objects.append(found)
    return images, objects


def synthetic(n: int, seed: int, num_classes: int = 6, side: int = 16) -> tuple[np.ndarray, list[list[dict]]]:
    """A tiny learnable multi-label set (category c: a bright bar in row band c), for offline checks
    in seconds (the conformance suite); never a benchmark. Categories 0 and 1 co-occur often."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 50, size=(n, 1, side, side)).astype(np.uint8)
    objects = []
    for i in range(n):
        present = set(np.flatnonzero(rng.random(num_classes) < 0.3).tolist()) or {int(rng.integers(num_classes))}
        if 0 in present and rng.random() < 0.6:
            present.add(1)
        found = []
        for c in sorted(present):
            images[i, 0, 2 * c + 2, 2:side - 2] = 230
            found.append({"category": c, "bbox": [2, 2 * c + 2, side - 4, 1]})
        objects.append(found)
    return images, objects


# --------------------------------------------------------------------------- COCO
def write_coco(root: Path, split: str, images: np.ndarray, objects: list[list[dict]], names: list[str]) -> Path:
    """Write ``root/<split>/<id>.png`` and ``root/annotations/instances_<split>.json`` (COCO layout;
    category ids start at 1 as in COCO)."""
    img_dir, ann_dir = Path(root) / split, Path(root) / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    doc = {"info": {"description": "smoothpurify multi-label data"}, "images": [], "annotations": [],
           "categories": [{"id": k + 1, "name": name, "supercategory": "item"} for k, name in enumerate(names)]}
    for i, (img, objs) in enumerate(zip(images, objects), start=1):
        name = f"{i:012d}.png"
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(img_dir / name)
        doc["images"].append({"id": i, "file_name": name, "height": int(img.shape[1]), "width": int(img.shape[2])})
        for obj in objs:
            x, y, w, h = obj["bbox"]
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": i, "category_id": obj["category"] + 1,
                                       "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    path = ann_dir / f"instances_{split}.json"
    write_json(path, doc)
    return path


def _read_image(path: Path, size: int | None, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise SmoothPurifyError(f"cannot read image {path}: {err}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_coco(root: Path, split: str, size: int | None = None, channels: int | None = None,
              limit: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images ``[N, C, H, W]`` uint8, multi-hot labels ``[N, K]`` float32 and category names, read
    through pycocotools from ``root/annotations/instances_<split>.json`` and ``root/<split>/``.
    Images without annotations are kept (all-negative labels), as COCO's own multi-label setup does."""
    try:
        from pycocotools.coco import COCO  # noqa: PLC0415 - optional extra, only for this loader
    except ImportError:
        raise SmoothPurifyError("reading COCO needs pycocotools: pip install 'smoothpurify[multilabel]'") from None
    ann = Path(root) / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        raise SmoothPurifyError(f"no COCO annotation file {ann}")
    import contextlib, io  # noqa: E401, PLC0415 - pycocotools prints progress on stdout
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco = COCO(str(ann))
        except (ValueError, KeyError, TypeError) as err:
            raise SmoothPurifyError(f"{ann} is not a COCO instances file: {err}") from None
    cat_ids = sorted(coco.getCatIds())
    index = {c: k for k, c in enumerate(cat_ids)}
    img_ids = sorted(coco.getImgIds())[:limit]
    infos = coco.loadImgs(img_ids)
    if channels is None:
        channels = 1 if infos and Image.open(Path(root) / split / infos[0]["file_name"]).mode in ("L", "1", "I") else 3
    if size is None and len({(i["height"], i["width"]) for i in infos}) > 1:
        raise SmoothPurifyError(f"{ann}: images differ in size; set multilabel.image_size")
    x = np.stack([_read_image(Path(root) / split / info["file_name"], size, channels) for info in infos]) \
        if infos else np.zeros((0, channels, size or 1, size or 1), np.uint8)
    y = np.zeros((len(img_ids), len(cat_ids)), dtype=np.float32)
    for row, img_id in enumerate(img_ids):
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None)):
            y[row, index[a["category_id"]]] = 1.0
    return x, y, [c["name"] for c in coco.loadCats(cat_ids)]


# --------------------------------------------------------------------------- VOC
def load_voc(root: Path, split: str, size: int | None = None, keep_difficult: bool = False,
             limit: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """VOC2007/2012 (``root`` = the ``VOC<year>`` folder): ``ImageSets/Main/<split>.txt``,
    ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg``; labels in the 20 standard classes."""
    root = Path(root)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise SmoothPurifyError(f"no VOC image set {listing}")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()][:limit]
    size = size or 224
    y = np.zeros((len(ids), len(VOC_NAMES)), dtype=np.float32)
    images = []
    for row, img_id in enumerate(ids):
        try:
            tree = ET.parse(root / "Annotations" / f"{img_id}.xml")
        except (OSError, ET.ParseError) as err:
            raise SmoothPurifyError(f"cannot read VOC annotation {img_id}.xml: {err}") from None
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in VOC_NAMES:
                raise SmoothPurifyError(f"{img_id}.xml: unknown VOC class {name!r}")
            if keep_difficult or (obj.findtext("difficult") or "0").strip() != "1":
                y[row, VOC_NAMES.index(name)] = 1.0
        images.append(_read_image(root / "JPEGImages" / f"{img_id}.jpg", size, 3))
    return (np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8)), y, list(VOC_NAMES)


def save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, x=x, y=y)
    os.replace(tmp, path)


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise SmoothPurifyError(f"no prepared split {path}; run the prepare stage first")
    with np.load(path, allow_pickle=False) as f:
        return f["x"], f["y"]


def cooccurrence(y: np.ndarray) -> np.ndarray:
    """Share of images holding each pair of categories (diagonal: each category alone)."""
    return (y.T @ y) / max(len(y), 1)

