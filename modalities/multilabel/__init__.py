"""Multi-label classification modality (entry point ``multilabel`` in ``smoothpurify.modalities``)."""
from modalities.multilabel.modality import MultilabelModality

__all__ = ["MultilabelModality"]
