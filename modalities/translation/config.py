"""Validated configuration of the translation modality (the ``translation`` section of params.yaml)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from modalities.kit import AttackParams, Strict, TrainParams

__all__ = ["TranslationParams"]


class TranslationParams(Strict):
    dataset: Literal["bible", "local", "synthetic"] = "bible"
    data_path: Optional[str] = Field(None, description="local: folder with train.<src> / train.<tgt> / test.<src> / "
                                                       "test.<tgt> (IWSLT, WMT14 after extraction)")
    src_lang: str = "en"
    tgt_lang: str = "es"
    vocab_size: int = Field(4000, ge=16, description="joint sentencepiece vocabulary")
    max_words: int = Field(30, ge=1, description="pairs with more words on either side are left out")
    max_tokens: int = Field(64, ge=4, description="subword tokens kept per sentence (EOS included)")
    val_size: int = Field(500, ge=1, description="clean validation pairs held out of training (the defender's data)")
    test_size: int = Field(1000, ge=1, description="test pairs (bible: held out of the corpus; local: first of test)")
    max_train: Optional[int] = Field(None, ge=10)
    deletion: float = Field(0.1, ge=0, lt=1, description="augment: share of source words deleted")
    model: str = "fconv_small"
    attacks: list[str] = Field(default_factory=lambda: ["trigger-word"])
    attack: AttackParams = Field(default_factory=AttackParams)
    train: TrainParams = Field(default_factory=TrainParams)
    device: str = "cpu"
