"""Video action-recognition modality (entry point ``video`` in ``smoothpurify.modalities``)."""
from modalities.video.modality import VideoModality

__all__ = ["VideoModality"]
