"""Validated configuration of the multi-label modality (the ``multilabel`` section of params.yaml)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from modalities.kit import AttackParams, Strict, TrainParams

__all__ = ["MultilabelParams", "LossParams", "MosaicParams"]


class MosaicParams(Strict):
    """The embedded default: 2x2 mosaics of Fashion-MNIST items (data.py)."""

    n_train: int = Field(8000, ge=20, description="mosaics composed from Fashion-MNIST train items (val included)")
    n_test: int = Field(2000, ge=20, description="mosaics composed from Fashion-MNIST test items")


class LossParams(Strict):
    """Training loss of the models (purification always uses the Bernoulli NLL)."""

    kind: Literal["asl", "bce"] = "asl"
    gamma_neg: float = Field(4.0, ge=0, description="ASL focusing on negatives (Ridnik et al. 2021: 4)")
    gamma_pos: float = Field(0.0, ge=0, description="ASL focusing on positives (0)")
    clip: float = Field(0.05, ge=0, lt=1, description="ASL probability margin m for negatives (0.05)")


class MultilabelParams(Strict):
    dataset: Literal["fashion_mosaic", "synthetic", "coco", "voc"] = "fashion_mosaic"
    data_path: Optional[str] = Field(None, description="coco: folder with annotations/ and image folders; "
                                                       "voc: the VOC<year> folder")
    train_split: str = Field("train2017", description="coco: instances_<split>.json; voc: ImageSets/Main/<split>.txt")
    test_split: str = Field("val2017", description="the split whose images are the test set")
    image_size: Optional[int] = Field(None, ge=8, description="resize (coco / voc); null keeps the mosaic's 56")
    val_fraction: float = Field(0.05, gt=0, lt=1)
    max_train: Optional[int] = Field(None, ge=10)
    max_test: Optional[int] = Field(None, ge=10)
    mosaic: MosaicParams = Field(default_factory=MosaicParams)
    model: str = "cnn_mldecoder"
    attacks: list[str] = Field(default_factory=lambda: ["hiding"])
    attack: AttackParams = Field(default_factory=AttackParams)
    train: TrainParams = Field(default_factory=TrainParams)
    loss: LossParams = Field(default_factory=LossParams)
    device: str = "cpu"
