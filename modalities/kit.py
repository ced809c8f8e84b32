"""What every classifier-like modality shares, so a modality package holds only what is its own.

:class:`ClassifierModality` implements the generic half of :class:`modalities.contract.Modality`:
training a benign or backdoored model (with the attack's own training when it has one), creating
attacks from params (registered names and named variants), saving and loading models and triggers
as safetensors, and evaluating ACC / ASR / RA on the test split. A subclass supplies its data
(``prepare_data``, ``load_split``, ``load_user_data``), its registries (``models``, ``attacks``),
its configuration model and ``model_kwargs`` (what its model factory needs from an input shape).

The pydantic pieces every modality's params section reuses (attack settings and variants, training
settings) live here too, and Fashion-MNIST, the data three modalities build on (image, multi-label
mosaics, video motion clips): the Debian package ``dataset-fashion-mnist`` installed; else a copy
another modality of the run folder fetched (``<run_dir>/<modality>/cache/fashion-mnist-deb``); else
fetched without root (``apt-get download`` + ``dpkg-deb -x``) into the caller's cache.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import load_into, load_meta, load_state, save_checkpoint
from smoothpurify.likelihood import Categorical, Likelihood
from smoothpurify.metrics import BACKDOOR_METRICS, Metric, backdoor_metrics
from smoothpurify.registry import Registry
from smoothpurify.training import predict, train
from modalities.contract import BENIGN, Attack

SPLITS = ("train", "val", "test")


# -- params pieces ----------------------------------------------------------------------------------

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_rate(v: Optional[float]) -> Optional[float]:
    if v is not None and not 0.0 < v <= 1.0:
        raise ValueError(f"must be in (0, 1], got {v}")
    return v


class AttackVariant(Strict):
    """A named setting of one attack (strength, mapping, options), usable wherever a name is."""

    attack: str = Field(description="the registered attack this is a setting of, e.g. badnets")
    mapping: Optional[Literal["all2one", "all2all"]] = None
    poison_rate: Optional[float] = Field(None, description="share of the training set (clean-label: of the target class)")
    target_label: Optional[int] = None
    options: dict = Field(default_factory=dict, description="merged over attack.options of the base attack")

    @field_validator("poison_rate")
    @classmethod
    def _rate(cls, v: Optional[float]) -> Optional[float]:
        return _check_rate(v)


class AttackParams(Strict):
    target_label: int = 0
    mapping: Literal["all2one", "all2all"] = "all2one"
    poison_rate: float = 0.1
    clean_label_rate: float = Field(0.8, description="clean-label attacks: share of target-class samples poisoned")
    options: dict[str, dict] = Field(default_factory=dict, description="per-attack options, e.g. blend: {alpha: 0.2}")
    variants: dict[str, AttackVariant] = Field(
        default_factory=dict, description="named settings, e.g. badnets-50: {attack: badnets, poison_rate: 0.5}")

    @field_validator("poison_rate", "clean_label_rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        return _check_rate(v)


class TrainParams(Strict):
    epochs: int = Field(4, ge=1)
    lr: float = Field(0.05, gt=0)
    batch_size: int = Field(128, ge=1)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    augment: bool = False


def validate_section(model_cls: type[BaseModel], params: dict[str, Any], section: str) -> Any:
    """``params[section]`` validated by ``model_cls``; the first problem as one error line."""
    try:
        return model_cls.model_validate(params.get(section, {}) or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SmoothPurifyError(f"params.yaml {section}.{where}: {first['msg']}") from None


# -- the generic modality ---------------------------------------------------------------------------

class ClassifierModality:
    """The generic half of a classifier-like modality (see the module docstring).

    A subclass's config (``params_model``) must have ``model: str``, ``attack: AttackParams``,
    ``train: TrainParams`` and ``device: str`` and may list in ``data_keys`` the fields that shape
    its prepared data.
    """

    name: ClassVar[str]
    likelihood: ClassVar[Likelihood] = Categorical()
    metrics: ClassVar[tuple[Metric, ...]] = BACKDOOR_METRICS
    models: ClassVar[Registry]
    attacks: ClassVar[Registry]
    params_model: ClassVar[type[BaseModel]]
    data_keys: ClassVar[tuple[str, ...]] = ()

    # ---------------------------------------------------------------- to supply
    def prepare_data(self, params: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def load_split(self, data_dir: Path, split: str) -> tuple[Any, torch.Tensor]:
        raise NotImplementedError

    def save_user_data(self, path: Path, inputs: Any, targets: torch.Tensor) -> None:
        raise SmoothPurifyError(f"the {self.name} modality cannot write data files yet")

    def model_kwargs(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        """What the model factory needs besides ``num_classes``, from one input's shape."""
        return {}

    def augment(self, inputs: Any, generator: torch.Generator) -> Any:
        return inputs

    def training_loss(self, cfg: Any) -> Likelihood:
        """The loss the benign and backdoored models are trained with (default: the likelihood;
        purification always uses :attr:`likelihood`). A modality whose models train with another
        loss (multi-label: ASL) returns an object with the same ``nll``."""
        return self.likelihood

    def train_augment(self, cfg: Any):
        """The augmentation ``train`` applies while training models (None: none)."""
        return self.augment if getattr(cfg.train, "augment", False) else None

    # ---------------------------------------------------------------- configuration
    def config(self, params: dict[str, Any] | None) -> Any:
        cfg = validate_section(self.params_model, params or {}, self.name)
        if getattr(cfg, "model", None) is not None and cfg.model not in self.models:
            raise SmoothPurifyError(f"params.yaml {self.name}.model: unknown model {cfg.model!r}; choose one of: "
                                    f"{', '.join(self.models)}")
        for name, variant in cfg.attack.variants.items():
            if name in self.attacks or name == BENIGN:
                raise SmoothPurifyError(f"params.yaml {self.name}.attack.variants: {name!r} is taken by a registered "
                                        "attack; give the variant its own name")
            if variant.attack not in self.attacks:
                raise SmoothPurifyError(f"params.yaml {self.name}.attack.variants.{name}: unknown attack "
                                        f"{variant.attack!r}; choose one of: {', '.join(self.attacks)}")
        return cfg

    def data_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The part of ``params`` that shapes the prepared data (its fingerprint)."""
        section = params.get(self.name, {}) or {}
        return {k: section.get(k) for k in self.data_keys}

    def training_params(self, params: dict[str, Any], attack: str) -> dict[str, Any]:
        """What training ``attack``'s model (or the benign one) depends on: not the list of attacks,
        nor other attacks' options and variants (so adding an attack retrains nothing else)."""
        section = {k: v for k, v in (params.get(self.name, {}) or {}).items() if k != "attacks"}
        settings = dict(section.pop("attack", None) or {})
        if attack != BENIGN:
            variant = (settings.pop("variants", None) or {}).get(attack)
            base = variant["attack"] if isinstance(variant, dict) and "attack" in variant else attack
            settings["options"] = (settings.get("options") or {}).get(base)
            section["attack"] = {**settings, "variant": variant}
        return section

    def model_names(self) -> list[str]:
        return list(self.models)

    def attack_names(self, params: dict[str, Any] | None = None) -> list[str]:
        return [*self.attacks, *(self.config(params).attack.variants if params is not None else ())]

    def create_model(self, name: str, **kwargs: Any) -> nn.Module:
        return self.models.get_or_raise(name)(**kwargs)

    # ---------------------------------------------------------------- data
    def data_meta(self, data_dir: Path) -> dict[str, Any]:
        path = Path(data_dir) / "data.json"
        if not path.is_file():
            raise SmoothPurifyError(f"no prepared data in {data_dir}; run the prepare stage first")
        return json.loads(path.read_text())

    def build_model(self, params: dict[str, Any], data_meta: dict[str, Any]) -> nn.Module:
        return self.create_model(self.config(params).model, num_classes=data_meta["num_classes"],
                                 **self.model_kwargs(tuple(data_meta["input_shape"])))

    # ---------------------------------------------------------------- attacks
    def create_attack(self, name: str, params: dict[str, Any], data_meta: dict[str, Any]) -> Attack:
        """The attack ``name``: a registered one, or a variant named in ``<modality>.attack.variants``."""
        cfg = self.config(params).attack
        variant = cfg.variants.get(name)
        base = variant.attack if variant is not None else name
        cls = self.attacks.get_or_raise(base, extra=list(cfg.variants))
        kwargs = {"target_label": cfg.target_label, "mapping": cfg.mapping,
                  "poison_rate": cfg.clean_label_rate if cls.clean_label else cfg.poison_rate}
        options = dict(cfg.options.get(base, {}))
        if variant is not None:
            kwargs.update({k: v for k, v in variant.model_dump(include={"target_label", "mapping", "poison_rate"}).items()
                           if v is not None})
            options.update(variant.options)
        return cls(num_classes=data_meta["num_classes"], input_shape=tuple(data_meta["input_shape"]),
                   seed=int(params.get("seed", 0)), **kwargs, **options)

    def load_attack(self, attack_dir: Path, data_meta: dict[str, Any]) -> Attack:
        path = Path(attack_dir) / "trigger.safetensors"
        desc = load_meta(path)
        if not desc:
            raise SmoothPurifyError(f"no trigger saved in {attack_dir}")
        options = {k: v for k, v in desc.items() if k not in
                   {"name", "clean_label", "target_label", "mapping", "poison_rate", "seed"}}
        attack = self.attacks.get_or_raise(desc["name"])(
            num_classes=data_meta["num_classes"], input_shape=tuple(data_meta["input_shape"]),
            target_label=desc["target_label"], mapping=desc["mapping"], poison_rate=desc["poison_rate"],
            seed=desc["seed"], **options)
        attack.load_state_dict(load_state(path))
        return attack

    # ---------------------------------------------------------------- models
    def train_model(self, params: dict[str, Any], data_dir: Path, attack_name: str | None,
                    out_dir: Path, progress: bool = True) -> dict[str, Any]:
        """Train a benign (``attack_name`` None) or backdoored model; save model + trigger."""
        cfg, seed = self.config(params), int(params.get("seed", 0))
        meta_data = self.data_meta(data_dir)
        x, y = self.load_split(data_dir, "train")
        attack, mask, poisoned = None, None, 0
        loss = self.training_loss(cfg)
        context = {"likelihood": loss, "train": cfg.train.model_dump(), "device": cfg.device,
                   "seed": seed, "make_model": lambda: self.build_model(params, meta_data), "train_fn": train,
                   "progress": progress}
        t0 = time.perf_counter()
        if attack_name is not None:
            attack = self.create_attack(attack_name, params, meta_data)
            if attack.clean_label:
                # Clean-label rates are quoted as a share of the target class; the base class counts the whole set.
                attack.poison_rate *= float((y == attack.target_label).float().mean())
            attack.fit(x, y, context)
            x, y, mask = attack.poison_training_set(x, y)
            poisoned = int(mask.sum())
        torch.manual_seed(seed)
        model = self.build_model(params, meta_data)
        losses = attack.train_model(model, x, y, mask, context) if attack is not None else None
        if losses is None:
            t = cfg.train
            losses = train(model, x, y, loss, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                           momentum=t.momentum, weight_decay=t.weight_decay, seed=seed, device=cfg.device,
                           augment=self.train_augment(cfg), desc=f"train {attack_name or BENIGN}", progress=progress)
        meta = {"architecture": cfg.model, "num_classes": meta_data["num_classes"],
                "input_shape": meta_data["input_shape"], "data_source": meta_data["source"],
                "attack": attack.describe() if attack else None, "seed": seed,
                "train": cfg.train.model_dump(), "train_loss": losses,
                "train_seconds": round(time.perf_counter() - t0, 2), "poisoned_samples": poisoned}
        if attack is not None:
            save_checkpoint(Path(out_dir) / "trigger.safetensors", attack.state_dict(), attack.describe())
        save_checkpoint(Path(out_dir) / "model.safetensors", model.cpu(), meta)
        return meta

    def load_model(self, model_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
        path = Path(model_dir) / "model.safetensors"
        meta = load_meta(path)
        if not meta:
            raise SmoothPurifyError(f"{path}: metadata sidecar missing; cannot rebuild the architecture")
        model = self.create_model(meta["architecture"], num_classes=meta["num_classes"],
                                  **self.model_kwargs(tuple(meta["input_shape"])))
        return load_into(model, load_state(path), source=str(path)).eval(), meta

    # ---------------------------------------------------------------- evaluation
    def poisoned_test(self, data_dir: Path, attack: Attack):
        """``((x, y), (x_poisoned, y_true, y_target))`` over the test split."""
        x, y = self.load_split(data_dir, "test")
        return (x, y), attack.poisoned_test_set(x, y)

    def evaluate(self, model: nn.Module, data_dir: Path, attack: Attack, device: str = "cpu") -> dict[str, float]:
        """ACC on the clean test set; ASR and RA on its poisoned copy (target-class inputs excluded)."""
        (x, y), (xp, yp_true, yp_target) = self.poisoned_test(data_dir, attack)
        return backdoor_metrics(predict(model, x, device=device), y,
                                predict(model, xp, device=device), yp_true, yp_target)


# -- Fashion-MNIST ----------------------------------------------------------------------------------

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


def unpack_deb(package: str, target: Path) -> Path:
    """The Debian ``package`` fetched without root (``apt-get download``) and unpacked whole
    (``dpkg-deb -x``) into ``target``, which is replaced only once the unpacking succeeded. One
    :class:`SmoothPurifyError` line when apt-get / dpkg-deb are missing or the download fails."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise SmoothPurifyError(f"apt-get and dpkg-deb are needed to fetch the Debian package {package}")
    target = Path(target)
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if got.returncode != 0 or not debs:
            raise SmoothPurifyError(f"apt-get download {package} failed: "
                                    f"{(got.stderr.strip().splitlines() or ['no package file'])[-1]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        try:
            unpacked = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], capture_output=True, text=True)
            if unpacked.returncode != 0:
                raise SmoothPurifyError(f"dpkg-deb -x {debs[0].name} failed: "
                                        f"{(unpacked.stderr.strip().splitlines() or ['no message'])[-1]}")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)   # only left when the unpacking failed
    return target


def fetch_fashion_deb(cache_dir: Path) -> Path | None:
    """The package's files under a cache (this one, or a sibling modality's), fetched into
    ``cache_dir`` when absent; None when they cannot be fetched (no apt-get / dpkg-deb, or no package)."""
    cache_dir = Path(cache_dir)
    for folder in [cache_dir / DEB_SUBDIR, *sorted(cache_dir.parent.parent.glob(f"*/cache/{DEB_SUBDIR}"))]:
        if _complete(folder):
            return folder
    try:
        unpack_deb("dataset-fashion-mnist", cache_dir / DEB_SUBDIR.parts[0])
    except SmoothPurifyError:
        return None
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
