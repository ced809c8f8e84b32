"""The `paper` profile's code path on CPU (no GPU here): CIFAR-10 binary batches, PreAct-ResNet18
with augmentation, BadNets on 3 channels, f-SFT (spectral) and NGF with lambda_max curves, analysis.

Synthetic CIFAR-format files stand in for the dataset; only the sizes and epochs are overridden, so
a shape or configuration error of the paper path fails here instead of on the GPU cluster.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.analysis import analyze_stage
from smoothpurify.checkpoint import load_state
from modalities.contract import register_modality
from pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def write_cifar_bin(folder: Path, per_batch: int, seed: int = 0) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        y = rng.integers(0, 10, per_batch).astype(np.uint8)
        x = rng.integers(0, 256, (per_batch, 3 * 32 * 32)).astype(np.uint8)
        (folder / name).write_bytes(np.concatenate([y[:, None], x], axis=1).tobytes())


@pytest.fixture
def paper_params(tmp_path):
    from modalities.image import ImageModality

    register_modality("image", ImageModality)
    write_cifar_bin(tmp_path / "cifar10" / "cifar-10-batches-bin", per_batch=40)
    return load_params(ROOT / "params.yaml", "paper", {
        "run_dir": str(tmp_path / "runs"),
        "image": {"data_path": str(tmp_path / "cifar10"), "device": "cpu", "val_fraction": 0.2,
                  "train": {"epochs": 1, "batch_size": 32}},
        "purify": {"common": {"epochs": 1}},
        "analysis": {"lanczos_steps": 3, "n_probes": 2, "n_clean": 4, "n_poison": 4, "threads": 1,
                     "curve_lambda_steps": 3}})


def test_paper_profile_path_runs_on_cpu(paper_params):
    img = paper_params["image"]
    assert img["model"] == "preact_resnet18" and img["dataset"] == "cifar10" and img["train"]["augment"]
    data = pipeline.prepare("image", paper_params)
    assert data["input_shape"] == [3, 32, 32] and data["sizes"]["test"] == 40
    for attack in ("benign", "badnets"):
        meta = pipeline.train_attack("image", paper_params, attack, progress=False)
        assert meta["architecture"] == "preact_resnet18"
    root = Path(paper_params["run_dir"]) / "image"
    original = load_state(root / "models" / "badnets" / "model.safetensors")
    rec = pipeline.evaluate("image", paper_params, "badnets")
    assert all(0.0 <= rec["backdoored"][k] <= 1.0 for k in ("acc", "asr", "ra"))
    for method in ("fsft", "ngf"):
        rec = pipeline.purify("image", paper_params, "badnets", method, progress=False)
        assert all(0.0 <= rec["after"][k] <= 1.0 for k in ("acc", "asr", "ra"))
        assert [c["epoch"] for c in rec["curves"]] and all(math.isfinite(c["lambda_max"]) for c in rec["curves"])
        purified = load_state(root / "purified" / "badnets" / method / "model.safetensors")
        # merged back into the original architecture: same tensors, same shapes, some changed
        assert {k: v.shape for k, v in purified.items()} == {k: v.shape for k, v in original.items()}
        assert any(not (purified[k] == original[k]).all() for k in original)
    stats = analyze_stage("image", paper_params, "badnets", "purified/fsft")
    assert math.isfinite(stats["lambda_max"]) and stats["trace_f"] > 0
