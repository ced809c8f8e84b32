"""Validated configuration of the image modality (the ``image`` section of params.yaml)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from smoothpurify import SmoothPurifyError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_rate(v: Optional[float]) -> Optional[float]:
    if v is not None and not 0.0 < v <= 1.0:
        raise ValueError(f"must be in (0, 1], got {v}")
    return v


class AttackVariant(_Strict):
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


class AttackParams(_Strict):
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


class TrainParams(_Strict):
    epochs: int = Field(4, ge=1)
    lr: float = Field(0.05, gt=0)
    batch_size: int = Field(128, ge=1)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    augment: bool = False


class ImageParams(_Strict):
    dataset: Literal["fashion_mnist", "cifar10", "gtsrb"] = "fashion_mnist"
    data_path: Optional[str] = None
    image_size: Optional[int] = None
    val_fraction: float = Field(0.01, gt=0, lt=1)
    max_train: Optional[int] = Field(None, ge=10)
    max_test: Optional[int] = Field(None, ge=10)
    model: str = "small_cnn"
    attacks: list[str] = Field(default_factory=lambda: ["badnets"])
    attack: AttackParams = Field(default_factory=AttackParams)
    train: TrainParams = Field(default_factory=TrainParams)
    device: str = "cpu"


def image_params(params: dict) -> ImageParams:
    try:
        return ImageParams.model_validate(params.get("image", {}))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SmoothPurifyError(f"params.yaml image.{where}: {first['msg']}") from None
