"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, shared by the modalities built on it
(image, multi-label mosaics, video motion clips). Data, not a modality: modalities may import it.

The files are the installed package's; else a copy another modality of the same run folder already
fetched (``<run_dir>/<modality>/cache/fashion-mnist-deb``); else the package fetched without root
(``apt-get download`` + ``dpkg-deb -x``) into the caller's cache.
"""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from smoothpurify import SmoothPurifyError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DEB_SUBDIR = Path("fashion-mnist-deb/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian header, then raw uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise SmoothPurifyError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SmoothPurifyError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for pair in FASHION_FILES.values() for f in pair)


def fetch_fashion_deb(cache_dir: Path) -> Path | None:
    """The package's files under a cache (this one, or a sibling modality's), fetched into
    ``cache_dir`` when absent; None when they cannot be fetched (no apt-get / dpkg-deb, or no package)."""
    cache_dir = Path(cache_dir)
    for folder in [cache_dir / DEB_SUBDIR, *sorted(cache_dir.parent.parent.glob(f"*/cache/{DEB_SUBDIR}"))]:
        if _complete(folder):
            return folder
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("dataset-fashion-mnist_*.deb"))
        if got.returncode != 0 or not debs:
            return None
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir))
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True)
        target = cache_dir / DEB_SUBDIR.parts[0]
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    folder = cache_dir / DEB_SUBDIR
    return folder if folder.is_dir() else None


def fashion_folder(cache_dir: Path) -> Path:
    """The folder of the four IDX files: installed, cached or fetched; one clear error when none works."""
    if _complete(FASHION_DIR):
        return FASHION_DIR
    folder = fetch_fashion_deb(cache_dir)
    if folder is None:
        raise SmoothPurifyError("Fashion-MNIST not found: install the Debian package dataset-fashion-mnist "
                                "(`apt-get download` of it failed or is not available)")
    return folder
