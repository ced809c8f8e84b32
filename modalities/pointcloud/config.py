"""Validated configuration of the point-cloud modality (the ``pointcloud`` section of params.yaml)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from modalities.kit import AttackParams, Strict, TrainParams

__all__ = ["PointCloudParams", "ComposeParams"]


class ComposeParams(Strict):
    """The embedded data: views of real meshes (Sweet Home 3D furniture or CGAL's; data.py, furniture.py)."""

    train_per_class: int = Field(300, ge=2, description="views per class from its training meshes (val included)")
    test_per_class: int = Field(100, ge=1, description="views per class from its test meshes")
    test_share: float = Field(0.34, gt=0, lt=1, description="share of each class's meshes held out for testing")
    orient: Literal["pca", "none"] = Field("pca", description="pca: each mesh turned into its principal frame "
                                           "(geometry.canonicalise) before its views; none: as modelled")
    up: Literal["minor", "middle", "major"] = Field("minor", description="orient pca: the principal axis that "
                                                    "becomes the up (z) axis the views rotate about")


class PointCloudParams(Strict):
    dataset: Literal["furniture", "cgal", "modelnet", "synthetic"] = "furniture"
    data_path: Optional[str] = Field(None, description="modelnet: ModelNet10/40 (<class>/<split>/*.off) or "
                                                       "modelnet40_normal_resampled folder")
    num_points: int = Field(512, ge=16, description="points per cloud")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="clean validation split held out of the training clouds")
    max_train: Optional[int] = Field(None, ge=10)
    max_test: Optional[int] = Field(None, ge=10)
    compose: ComposeParams = Field(default_factory=ComposeParams)
    model: str = "pointnet2_ssg_small"
    attacks: list[str] = Field(default_factory=lambda: ["pointba-i"])
    attack: AttackParams = Field(default_factory=AttackParams)
    train: TrainParams = Field(default_factory=TrainParams)
    device: str = "cpu"
