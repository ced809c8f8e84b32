"""Shared fixtures: one torch thread, and a tiny learnable image dataset behind the real pipeline."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for the whole session, set before any module fixture builds.

    The tests run tiny models and hundreds of tiny HVPs: OpenMP hand-offs dominate, and on a busy
    2-core machine a second thread made them 10-40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_images(n: int, seed: int = 0, side: int = 12):
    """10 classes; class c is a bright horizontal bar at row c plus noise (easy to learn)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = rng.integers(0, 60, size=(n, 1, side, side)).astype(np.uint8)
    x[np.arange(n), 0, y, :] = 220
    return x, y.astype(np.int64)


@pytest.fixture
def tiny_params(tmp_path, monkeypatch):
    """params for the image pipeline on tiny synthetic data, run folder under tmp_path."""
    from modalities.image import data as imdata
    from modalities.contract import register_modality
    from modalities.image import ImageModality

    register_modality("image", ImageModality)
    splits = {"train": tiny_images(1500, 0), "test": tiny_images(400, 1)}
    monkeypatch.setattr(imdata, "load_embedded", lambda cache: (splits, "tiny synthetic (tests)"))
    return {
        "seed": 0, "profile": "test", "run_dir": str(tmp_path / "runs"),
        "image": {"dataset": "fashion_mnist", "val_fraction": 0.05, "model": "small_cnn",
                  "attacks": ["badnets"],
                  "attack": {"target_label": 0, "poison_rate": 0.1},
                  "train": {"epochs": 4, "lr": 0.05, "batch_size": 64}},
        # No augmentation by default here: a tiny image's class is its bar's row, which a shift changes.
        "purify": {"methods": ["ft", "ngf"], "common": {"epochs": 3, "lr_step": 2, "augment": False}},
    }
