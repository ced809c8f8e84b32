"""Validated configuration of the video modality (the ``video`` section of params.yaml)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from modalities.kit import AttackParams, Strict, TrainParams

__all__ = ["VideoParams", "ComposeParams"]


class ComposeParams(Strict):
    """The embedded default: moving Fashion-MNIST items, the motion is the class (data.py)."""

    train_per_class: int = Field(250, ge=2, description="clips per motion class from Fashion-MNIST train items (val included)")
    test_per_class: int = Field(80, ge=1, description="clips per motion class from Fashion-MNIST test items")
    noise: float = Field(0.04, ge=0, le=0.5, description="Gaussian pixel noise (sigma, in [0, 1] units)")
    distractor: float = Field(0.5, ge=0, le=1, description="brightness of the second, randomly moving item (0: none)")
    codec: Literal["h264", "ffv1"] = Field("h264", description="h264 (.mp4, lossy like real data) | ffv1 (.avi, lossless)")


class VideoParams(Strict):
    dataset: Literal["fashion_motion", "ucf101", "hmdb51", "synthetic"] = "fashion_motion"
    data_path: Optional[str] = Field(None, description="ucf101: folder with UCF-101/ and ucfTrainTestlist/; "
                                                       "hmdb51: folder with <class>/ and testTrainMulti_7030_splits/")
    fold: int = Field(1, ge=1, le=3, description="the official split (UCF-101 and HMDB-51 have three)")
    frames: int = Field(8, ge=2, description="frames per clip, sampled uniformly over the video")
    size: int = Field(32, ge=16, description="frame side after short-side scaling and a centre crop")
    channels: Literal[1, 3] = 1
    val_fraction: float = Field(0.1, gt=0, lt=1, description="clean validation split held out of the training clips")
    max_train: Optional[int] = Field(None, ge=10)
    max_test: Optional[int] = Field(None, ge=10)
    compose: ComposeParams = Field(default_factory=ComposeParams)
    model: str = "cnn_lstm"
    attacks: list[str] = Field(default_factory=lambda: ["clean-label"])
    attack: AttackParams = Field(default_factory=AttackParams)
    train: TrainParams = Field(default_factory=TrainParams)
    device: str = "cpu"
