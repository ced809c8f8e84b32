"""Validated configuration of the image modality (the ``image`` section of params.yaml)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from modalities.kit import AttackParams, AttackVariant, Strict, TrainParams, validate_section

__all__ = ["ImageParams", "image_params", "AttackParams", "AttackVariant", "TrainParams"]


class ImageParams(Strict):
    dataset: Literal["fashion_mnist", "cifar10", "gtsrb", "synthetic"] = "fashion_mnist"
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
    return validate_section(ImageParams, params, "image")
