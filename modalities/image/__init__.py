"""Image classification modality (entry point ``image`` in ``smoothpurify.modalities``)."""
from modalities.image.modality import ImageModality

__all__ = ["ImageModality"]
