"""Multi-label data and metrics: the COCO round trip through pycocotools, the VOC reader, the
mosaics' structured co-occurrence, mAP against torchmetrics and scikit-learn."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from smoothpurify import SmoothPurifyError
from modalities.multilabel import data as mldata
from modalities.multilabel.metrics import mean_average_precision


def _labels(objects, k):
    y = np.zeros((len(objects), k), np.float32)
    for i, objs in enumerate(objects):
        for o in objs:
            y[i, o["category"]] = 1
    return y


def test_coco_round_trip_through_pycocotools(tmp_path):
    images, objects = mldata.synthetic(30, seed=3)
    names = [f"bar{k}" for k in range(6)]
    ann = mldata.write_coco(tmp_path, "train", images, objects, names)
    doc = json.loads(ann.read_text())
    assert doc["categories"][0] == {"id": 1, "name": "bar0", "supercategory": "item"}  # COCO ids start at 1
    assert len(doc["annotations"]) == sum(len(o) for o in objects)
    assert all(len(a["bbox"]) == 4 and a["area"] == a["bbox"][2] * a["bbox"][3] for a in doc["annotations"])
    x, y, got_names = mldata.load_coco(tmp_path, "train")
    assert got_names == names
    np.testing.assert_array_equal(x, images)  # PNG is lossless
    np.testing.assert_array_equal(y, _labels(objects, 6))
    with pytest.raises(SmoothPurifyError, match="no COCO annotation file"):
        mldata.load_coco(tmp_path, "val")


def test_mosaic_boxes_and_structured_cooccurrence():
    rng = np.random.default_rng(0)
    items = rng.integers(1, 255, size=(200, 28, 28)).astype(np.uint8)
    items[:, :3] = 0  # blank top rows: the box starts below them
    labels = np.arange(200) % 10
    x, objects = mldata.compose_mosaics(items, labels, 3000, seed=0)
    assert x.shape == (3000, 1, 56, 56)
    box = objects[0][0]["bbox"]
    assert box[1] % 28 == 3 and box[2] == 28 and box[3] == 25
    y = _labels(objects, 10)
    co = mldata.cooccurrence(y)
    # sandal + dress share the summer scene, sandal + coat only meet through random items
    assert co[5, 3] > 4 * co[5, 4]
    assert 1.5 < y.sum(1).mean() < 3.5


def test_voc_reader(tmp_path):
    root = tmp_path / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main" / "val.txt").write_text("000001\n000002\n")
    objs = {"000001": [("person", 0), ("car", 1)], "000002": [("dog", 0), ("dog", 0)]}
    for img_id, found in objs.items():
        body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in found)
        (root / "Annotations" / f"{img_id}.xml").write_text(f"<annotation>{body}</annotation>")
        Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "JPEGImages" / f"{img_id}.jpg")
    x, y, names = mldata.load_voc(root, "val", size=32)
    assert x.shape == (2, 3, 32, 32) and names[14] == "person"
    assert y[0].nonzero()[0].tolist() == [14]  # the difficult car is left out
    assert y[1].nonzero()[0].tolist() == [names.index("dog")]
    _, y_all, _ = mldata.load_voc(root, "val", size=32, keep_difficult=True)
    assert y_all[0].nonzero()[0].tolist() == [6, 14]
    with pytest.raises(SmoothPurifyError, match="no VOC image set"):
        mldata.load_voc(root, "train")


def test_map_matches_torchmetrics_and_sklearn():
    from sklearn.metrics import average_precision_score

    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(300, 7, generator=gen) < 0.3).float()
    scores = labels * 0.8 + torch.rand(300, 7, generator=gen)
    scores[:50, 0] = 0.5  # ties
    ours = mean_average_precision(scores, labels)
    assert ours == pytest.approx(average_precision_score(labels.numpy(), scores.numpy(), average="macro"), abs=1e-6)
    from modalities.image.torchvision_compat import import_torchvision  # torchmetrics imports torchvision

    import_torchvision()
    from torchmetrics.classification import MultilabelAveragePrecision

    tm = MultilabelAveragePrecision(num_labels=7, average="macro", thresholds=None)
    assert ours == pytest.approx(float(tm(scores, labels.long())), abs=1e-5)
    assert mean_average_precision(labels, labels) == 1.0
    assert mean_average_precision(-labels, labels) < 0.5
