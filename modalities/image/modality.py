"""The image-classification modality: data, models, attacks and metrics behind the core protocol."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import load_into, load_meta, load_state, save_checkpoint, write_json
from smoothpurify.likelihood import Categorical
from smoothpurify.metrics import backdoor_metrics
from smoothpurify.training import predict, train
from modalities.base import Attack
from modalities.image import data as imdata
from modalities.image.augment import random_shift
from modalities.image.attacks import ATTACKS, create_attack
from modalities.image.config import ImageParams, image_params
from modalities.image.models import MODELS, create_model

SPLITS = ("train", "val", "test")


class ImageModality:
    name = "image"
    likelihood = Categorical()

    # ---------------------------------------------------------------- registry views
    def model_names(self) -> list[str]:
        return list(MODELS)

    def attack_names(self, params: dict[str, Any] | None = None) -> list[str]:
        return [*ATTACKS, *(self.config(params).attack.variants if params is not None else ())]

    def config(self, params: dict[str, Any]) -> ImageParams:
        cfg = image_params(params)
        for name, variant in cfg.attack.variants.items():
            if name in ATTACKS or name == "benign":
                raise SmoothPurifyError(f"params.yaml image.attack.variants: {name!r} is taken by a registered "
                                        "attack; give the variant its own name")
            if variant.attack not in ATTACKS:
                raise SmoothPurifyError(f"params.yaml image.attack.variants.{name}: unknown attack "
                                        f"{variant.attack!r}; choose one of: {', '.join(ATTACKS)}")
        return cfg

    def training_params(self, params: dict[str, Any], attack: str) -> dict[str, Any]:
        """The ``image`` params that training ``attack``'s model (or "benign") depends on: not the
        list of attacks, nor other attacks' options and variants."""
        section = {k: v for k, v in params.get("image", {}).items() if k != "attacks"}
        settings = dict(section.pop("attack", None) or {})
        if attack != "benign":
            variant = (settings.pop("variants", None) or {}).get(attack)
            base = variant["attack"] if isinstance(variant, dict) and "attack" in variant else attack
            settings["options"] = (settings.get("options") or {}).get(base)
            section["attack"] = {**settings, "variant": variant}
        return section

    def create_model(self, name: str, **kwargs: Any) -> nn.Module:
        return create_model(name, **kwargs)

    # ---------------------------------------------------------------- data
    def _load_source(self, cfg: ImageParams, cache_dir: Path):
        if cfg.dataset == "fashion_mnist":
            return imdata.load_embedded(cache_dir)
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

    def data_meta(self, data_dir: Path) -> dict[str, Any]:
        path = Path(data_dir) / "data.json"
        if not path.is_file():
            raise SmoothPurifyError(f"no prepared data in {data_dir}; run the prepare stage first")
        return json.loads(path.read_text())

    def load_split(self, data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in SPLITS:
            raise SmoothPurifyError(f"unknown split {split!r}; choose {', '.join(SPLITS)}")
        x, y = imdata.load_npz(Path(data_dir) / f"{split}.npz")
        return imdata.to_float(x), torch.from_numpy(y)

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
            if len(mean) not in (1, x.shape[1]) or len(std) != len(mean):
                raise SmoothPurifyError(f"--normalize needs 1 or {x.shape[1]} values for mean and for std, "
                                        f"got {len(mean)} and {len(std)}")
            if bool((std <= 0).any()):
                raise SmoothPurifyError("--normalize: std must be positive")
            x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return x, torch.from_numpy(y)

    # ---------------------------------------------------------------- attacks and models
    def create_attack(self, name: str, params: dict[str, Any], data_meta: dict[str, Any]) -> Attack:
        """The attack ``name``: a registered one, or a variant named in ``image.attack.variants``."""
        cfg = self.config(params).attack
        variant = cfg.variants.get(name)
        base = variant.attack if variant is not None else name
        if base not in ATTACKS:  # variants' bases were checked by config()
            raise SmoothPurifyError(f"unknown attack {name!r}; choose one of: {', '.join([*ATTACKS, *cfg.variants])}")
        clean_label = ATTACKS[base].clean_label
        kwargs = {"target_label": cfg.target_label, "mapping": cfg.mapping,
                  "poison_rate": cfg.clean_label_rate if clean_label else cfg.poison_rate}
        options = dict(cfg.options.get(base, {}))
        if variant is not None:
            kwargs.update({k: v for k, v in variant.model_dump(include={"target_label", "mapping", "poison_rate"}).items()
                           if v is not None})
            options.update(variant.options)
        return create_attack(base, num_classes=data_meta["num_classes"], input_shape=tuple(data_meta["input_shape"]),
                             seed=int(params.get("seed", 0)), **kwargs, **options)

    def _clean_label_rate_to_global(self, attack: Attack, y: torch.Tensor) -> None:
        # Clean-label rates are quoted as a share of the target class; the base class counts the whole set.
        if attack.clean_label:
            share = float((y == attack.target_label).float().mean())
            attack.poison_rate = attack.poison_rate * share

    def build_model(self, params: dict[str, Any], data_meta: dict[str, Any]) -> nn.Module:
        cfg = self.config(params)
        c, h, _ = data_meta["input_shape"]
        return create_model(cfg.model, num_classes=data_meta["num_classes"], in_channels=c, image_size=h)

    def train_model(self, params: dict[str, Any], data_dir: Path, attack_name: str | None,
                    out_dir: Path, progress: bool = True) -> dict[str, Any]:
        """Train a benign (``attack_name`` None) or backdoored model; save model + trigger."""
        cfg, seed = self.config(params), int(params.get("seed", 0))
        meta_data = self.data_meta(data_dir)
        x, y = self.load_split(data_dir, "train")
        attack, mask = None, None
        context = {"likelihood": self.likelihood, "train": cfg.train.model_dump(), "device": cfg.device,
                   "seed": seed, "make_model": lambda: self.build_model(params, meta_data), "train_fn": train,
                   "progress": progress}
        t0 = time.perf_counter()
        if attack_name is not None:
            attack = self.create_attack(attack_name, params, meta_data)
            self._clean_label_rate_to_global(attack, y)
            attack.fit(x, y, context)
            x, y, mask = attack.poison_training_set(x, y)
            poisoned = int(mask.sum())
        torch.manual_seed(seed)
        model = self.build_model(params, meta_data)
        losses = attack.train_model(model, x, y, mask, context) if attack is not None else None
        if losses is None:
            losses = train(model, x, y, self.likelihood, epochs=cfg.train.epochs, lr=cfg.train.lr,
                           batch_size=cfg.train.batch_size, momentum=cfg.train.momentum,
                           weight_decay=cfg.train.weight_decay, seed=seed, device=cfg.device,
                           augment=random_shift if cfg.train.augment else None,
                           desc=f"train {attack_name or 'benign'}", progress=progress)
        out_dir = Path(out_dir)
        meta = {"architecture": cfg.model, "num_classes": meta_data["num_classes"],
                "input_shape": meta_data["input_shape"], "data_source": meta_data["source"],
                "attack": attack.describe() if attack else None, "seed": seed,
                "train": cfg.train.model_dump(), "train_loss": losses,
                "train_seconds": round(time.perf_counter() - t0, 2),
                "poisoned_samples": poisoned if attack else 0}
        if attack is not None:
            save_checkpoint(out_dir / "trigger.safetensors", attack.state_dict(), attack.describe())
        save_checkpoint(out_dir / "model.safetensors", model.cpu(), meta)
        return meta

    def load_model(self, model_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
        path = Path(model_dir) / "model.safetensors"
        meta = load_meta(path)
        if not meta:
            raise SmoothPurifyError(f"{path}: metadata sidecar missing; cannot rebuild the architecture")
        c, h, _ = meta["input_shape"]
        model = create_model(meta["architecture"], num_classes=meta["num_classes"], in_channels=c, image_size=h)
        return load_into(model, load_state(path), source=str(path)).eval(), meta

    def load_attack(self, attack_dir: Path, data_meta: dict[str, Any]) -> Attack:
        path = Path(attack_dir) / "trigger.safetensors"
        desc = load_meta(path)
        if not desc:
            raise SmoothPurifyError(f"no trigger saved in {attack_dir}")
        options = {k: v for k, v in desc.items() if k not in
                   {"name", "clean_label", "target_label", "mapping", "poison_rate", "seed"}}
        attack = create_attack(desc["name"], num_classes=data_meta["num_classes"],
                               input_shape=tuple(data_meta["input_shape"]), target_label=desc["target_label"],
                               mapping=desc["mapping"], poison_rate=desc["poison_rate"], seed=desc["seed"], **options)
        attack.load_state_dict(load_state(path))
        return attack

    def augment(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random shifts by up to 2 pixels per image, as in training; no flips (they move a patch)."""
        return random_shift(inputs, generator)

    # ---------------------------------------------------------------- evaluation
    def poisoned_test(self, data_dir: Path, attack: Attack):
        x, y = self.load_split(data_dir, "test")
        return (x, y), attack.poisoned_test_set(x, y)

    def evaluate(self, model: nn.Module, data_dir: Path, attack: Attack, device: str = "cpu") -> dict[str, float]:
        """ACC on the clean test set; ASR and RA on its poisoned copy (target-class inputs excluded)."""
        (x, y), (xp, yp_true, yp_target) = self.poisoned_test(data_dir, attack)
        return backdoor_metrics(predict(model, x, device=device), y,
                                predict(model, xp, device=device), yp_true, yp_target)
