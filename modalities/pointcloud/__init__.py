"""Point-cloud classification modality (entry point ``pointcloud`` in ``smoothpurify.modalities``)."""
from modalities.pointcloud.modality import PointCloudModality

__all__ = ["PointCloudModality"]
