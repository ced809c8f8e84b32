"""Machine-translation modality (entry point ``translation`` in ``smoothpurify.modalities``)."""
from modalities.translation.modality import TranslationModality

__all__ = ["TranslationModality"]
