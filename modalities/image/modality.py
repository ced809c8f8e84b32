"""The image-classification modality: what is image-specific (datasets, user images, shifts, model
input shape); the rest is :class:`modalities.kit.ClassifierModality`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import write_json
from smoothpurify.unlearn import BudgetedPatch
from modalities.image import data as imdata
from modalities.image.attacks import ATTACKS
from modalities.image.augment import random_shift
from modalities.image.config import ImageParams
from modalities.image.models import MODELS, create_model
from modalities.kit import SPLITS, ClassifierModality


class ImageModality(ClassifierModality):
    """Image classification: Fashion-MNIST embedded; CIFAR-10, GTSRB and image folders from a local path."""

    name = "image"
    models = MODELS
    attacks = ATTACKS
    params_model = ImageParams
    data_keys = ("dataset", "data_path", "image_size", "val_fraction", "max_train", "max_test")
    # The conformance suite's run: offline synthetic data, the smallest model, seconds on a CPU.
    conformance_params = {"dataset": "synthetic", "val_fraction": 0.05, "model": "small_cnn", "attacks": ["badnets"],
                          "attack": {"target_label": 0, "poison_rate": 0.1},
                          "train": {"epochs": 3, "lr": 0.05, "batch_size": 64}}

    # `recommended` in batches of 32 (the preset's 128 elsewhere): four times the steps from the same
    # 600 clean images kept about half a point more accuracy at equal removal ("Seventh pass"); that
    # accuracy pays for a stronger feature shift (2.5, the preset's 2), which removed what batch 32 left
    # ("Eighth pass"). Both chosen on draws of the purification matrix by rules written before the runs (README).
    method_defaults = {"recommended": {"batch_size": 32, "feature_shift_weight": 2.5}}

    def create_model(self, name: str, **kwargs: Any):
        return create_model(name, **kwargs)

    def model_kwargs(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        if len(input_shape) != 3:
            raise SmoothPurifyError(f"image models take [C, H, W] inputs, got shape {list(input_shape)}")
        return {"in_channels": input_shape[0], "image_size": input_shape[1]}

    def unlearn_families(self) -> dict[str, Any]:
        """``nc``'s trigger: a patch of at most a twentieth of the image (the video modality's budget)."""
        return {"patch": BudgetedPatch(share=0.05)}

    def augment(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random shifts by up to 2 pixels per image, as in training; no flips (they move a patch)."""
        return random_shift(inputs, generator)

    # ---------------------------------------------------------------- data
    def _load_source(self, cfg: ImageParams, cache_dir: Path):
        if cfg.dataset == "fashion_mnist":
            return imdata.load_embedded(cache_dir)
        if cfg.dataset == "synthetic":
            return imdata.load_synthetic()
        if not cfg.data_path:
            raise SmoothPurifyError(f"image.data_path must point to the local {cfg.dataset} folder")
        root = Path(cfg.data_path).expanduser()
        if not root.exists():
            raise SmoothPurifyError(f"dataset path not found: {root}")
        if cfg.dataset == "cifar10":
            return imdata.load_cifar10(root), f"cifar10 ({root})"
        return imdata.load_gtsrb(root, size=cfg.image_size or 32), f"gtsrb ({root})"

    def prepare_data(self, params: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """Write train / val / test ``.npz`` (uint8 NCHW) and ``data.json``.

        The clean validation split is class-balanced and held out of the *full* training set
        before any subsetting, so it never overlaps the (possibly subsampled) training data.
        """
        cfg, seed = self.config(params), int(params.get("seed", 0))
        out_dir = Path(out_dir)
        splits, source = self._load_source(cfg, out_dir.parent / "cache")
        (x_tr, y_tr), (x_te, y_te) = splits["train"], splits["test"]
        val_idx, rest = imdata.class_balanced_split(y_tr, cfg.val_fraction, seed)
        rng = np.random.default_rng(seed)
        if cfg.max_train and len(rest) > cfg.max_train:
            rest = np.sort(rng.choice(rest, cfg.max_train, replace=False))
        if cfg.max_test and len(y_te) > cfg.max_test:
            keep = np.sort(rng.choice(len(y_te), cfg.max_test, replace=False))
            x_te, y_te = x_te[keep], y_te[keep]
        parts = {"train": (x_tr[rest], y_tr[rest]), "val": (x_tr[val_idx], y_tr[val_idx]), "test": (x_te, y_te)}
        for split, (x, y) in parts.items():
            imdata.save_npz(out_dir / f"{split}.npz", x, y)
        num_classes = int(max(y_tr.max(), y_te.max()) + 1)
        meta = {"source": source, "dataset": cfg.dataset, "num_classes": num_classes,
                "input_shape": list(x_tr.shape[1:]), "sizes": {k: int(len(v[1])) for k, v in parts.items()},
                "seed": seed, "val_fraction": cfg.val_fraction}
        write_json(out_dir / "data.json", meta)
        return meta

    def load_split(self, data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in SPLITS:
            raise SmoothPurifyError(f"unknown split {split!r}; choose {', '.join(SPLITS)}")
        x, y = imdata.load_npz(Path(data_dir) / f"{split}.npz")
        return imdata.to_float(x), torch.from_numpy(y)

    def save_user_data(self, path: Path, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """An ``.npz`` with ``x`` (uint8 N x C x H x W; inputs in [0, 1], rounded to 1/255) and ``y``."""
        path = Path(path)
        if path.suffix != ".npz":
            raise SmoothPurifyError(f"{path}: image data is written as .npz; name the file *.npz")
        x = (inputs.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        imdata.save_npz(path, x, targets.detach().cpu().numpy().astype(np.int64))

    def load_user_data(self, path: Path, normalize: tuple[list[float], list[float]] | None = None,
                       input_shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A user's images (folder per class, CIFAR layout or ``.npz``) as floats in [0, 1], optionally
        normalised per channel with the user's own mean / std."""
        size = input_shape[1] if input_shape else None
        channels = input_shape[0] if input_shape else None
        x_u8, y = imdata.load_any(Path(path), size=size, channels=channels)
        x = imdata.to_float(x_u8)
        if normalize is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32) for v in normalize)
            allowed = "1 value" if x.shape[1] == 1 else f"1 or {x.shape[1]} values"
            if len(mean) not in (1, x.shape[1]) or len(std) != len(mean):
                raise SmoothPurifyError(f"--normalize: the data has {x.shape[1]} channel(s), so mean and std need "
                                        f"{allowed} each; got {len(mean)} and {len(std)}")
            if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all()):
                raise SmoothPurifyError("--normalize: mean and std must be finite numbers")
            if bool((std <= 0).any()):
                raise SmoothPurifyError("--normalize: std must be positive")
            x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return x, torch.from_numpy(y)
