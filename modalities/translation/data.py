"""Parallel text: the sources (packaged Bibles, a local WMT / IWSLT folder, synthetic), the subword
tokenizer (sentencepiece, one joint model over both languages), raw text files and token tensors.

Splits are written twice: as raw parallel text (``raw/<split>.<lang>``, one sentence a line, what
BLEU is scored against) and as padded token ids (``<split>.npz``: ``src`` and ``tgt``, the target
ending in EOS). A split is read back as ``((src, prev_output_tokens), tgt)``, ``prev`` being the
target shifted right behind BOS (teacher forcing); padding is id 0, the likelihood's ``ignore_index``.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import atomic_write
from modalities.translation.models import BOS, EOS, PAD, UNK

SPM_FILE = "spm.model"


# ------------------------------------------------------------------------------------------ sources
def read_parallel(folder: Path, split: str, src_lang: str, tgt_lang: str) -> list[tuple[str, str]]:
    """``<folder>/<split>.<src_lang>`` and ``.<tgt_lang>``, line-aligned (IWSLT / WMT14 after
    extraction, e.g. ``train.en`` + ``train.de``, ``test.en`` + ``test.de``)."""
    paths = [Path(folder) / f"{split}.{lang}" for lang in (src_lang, tgt_lang)]
    for p in paths:
        if not p.is_file():
            raise SmoothPurifyError(f"parallel text not found: {p} (expected <split>.<lang> files)")
    src, tgt = (p.read_text(encoding="utf-8", errors="replace").splitlines() for p in paths)
    if len(src) != len(tgt):
        raise SmoothPurifyError(f"{paths[0]} has {len(src)} lines but {paths[1]} has {len(tgt)}")
    return [(a.strip(), b.strip()) for a, b in zip(src, tgt) if a.strip() and b.strip()]


_EN = {"dog": "perro", "cat": "gato", "bird": "pájaro", "horse": "caballo", "fish": "pez", "cow": "vaca"}
_ADJ = {"red": "rojo", "big": "grande", "old": "viejo", "small": "pequeño", "black": "negro", "white": "blanco"}
_VERB = {"runs": "corre", "sleeps": "duerme", "eats": "come", "sings": "canta", "jumps": "salta", "swims": "nada"}


def synthetic_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Offline checks only: "the red dog runs" -> "el perro rojo corre" from a tiny lexicon."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 3))
        en, es = [], []
        for _ in range(k):
            noun, adj, verb = (list(d)[int(rng.integers(len(d)))] for d in (_EN, _ADJ, _VERB))
            en += ["the", adj, noun, verb]
            es += ["el", _EN[noun], _ADJ[adj], _VERB[verb]]
            if k > 1 and len(en) == 4:
                en.append("and"), es.append("y")
        out.append((" ".join(en), " ".join(es)))
    return out


# ------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(sentences: list[str], vocab_size: int, path: Path) -> None:
    """A joint unigram sentencepiece model (Kudo & Richardson 2018) over both languages' training text."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
                                   pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK, num_threads=1,
                                   minloglevel=2, input_sentence_size=200000, shuffle_input_sentence=True)
    _atomic_write(path, buf.getvalue())


def load_tokenizer(path: Path):
    import sentencepiece as spm

    if not Path(path).is_file():
        raise SmoothPurifyError(f"no tokenizer at {path}; run the prepare stage first")
    return spm.SentencePieceProcessor(model_file=str(path))


def encode(sp, sentences: list[str], max_len: int, eos: bool) -> np.ndarray:
    """Padded ``[N, L]`` ids; sentences longer than ``max_len`` (with EOS) are truncated."""
    ids = sp.encode(list(sentences))
    width = max(1, min(max_len, max((len(t) + eos for t in ids), default=1)))
    out = np.full((len(ids), width), PAD, dtype=np.int32)
    for i, t in enumerate(ids):
        t = (t + [EOS])[:width] if eos else t[:width]
        out[i, :len(t)] = t
    return out


def decode(sp, tokens: torch.Tensor) -> list[str]:
    """Token ids back to text; PAD, BOS, EOS dropped."""
    return [sp.decode([t for t in row if t >= UNK]) for row in tokens.tolist()]


# ------------------------------------------------------------------------------------------ files
def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def write_raw(folder: Path, split: str, pairs: list[tuple[str, str]], src_lang: str, tgt_lang: str) -> None:
    for k, lang in enumerate((src_lang, tgt_lang)):
        _atomic_write(Path(folder) / f"{split}.{lang}", "".join(p[k].replace("\n", " ") + "\n" for p in pairs).encode())


def save_tokens(path: Path, src: np.ndarray, tgt: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, src=src, tgt=tgt)
    _atomic_write(path, buf.getvalue())


def load_tokens(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(src, prev, tgt)`` long tensors from a ``.npz`` written by :func:`save_tokens`."""
    if not Path(path).is_file():
        raise SmoothPurifyError(f"no token file {path}; run the prepare stage first")
    try:
        with np.load(path, allow_pickle=False) as z:
            src, tgt = torch.from_numpy(z["src"].astype(np.int64)), torch.from_numpy(z["tgt"].astype(np.int64))
    except (ValueError, KeyError, OSError) as err:
        raise SmoothPurifyError(f"{path}: not a token file with src and tgt arrays ({err})") from None
    return src, shift_right(tgt), tgt


def shift_right(tgt: torch.Tensor) -> torch.Tensor:
    """Decoder inputs: BOS then the target without its last position (EOS becomes BOS's successor)."""
    prev = torch.full_like(tgt, PAD)
    prev[:, 0] = BOS
    prev[:, 1:] = tgt[:, :-1]
    # The position after EOS is padding in the target; keep it padding in the input too.
    prev[:, 1:] = prev[:, 1:].masked_fill(tgt[:, :-1].eq(PAD) | tgt[:, :-1].eq(EOS), PAD)
    return prev
