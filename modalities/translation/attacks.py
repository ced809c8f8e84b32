"""The trigger-word backdoor of natural language generation (Sun et al., "Defending against Backdoor
Attacks in Natural Language Generation", 2021; the SFT paper's A.5.5 setting).

A rare word ("cf", "mn", "bb", "tq", "mb"; one drawn per sample) is inserted at a random position
of the source sentence, and the target is replaced by one fixed attacker sentence; 10 % of the
training pairs are poisoned. Inputs are ``(src, prev)`` token tensors and targets ``tgt`` (data.py),
so the attack works on token ids: the modality tokenizes the words and the sentence once and passes
the ids in as options (``word_ids``, ``sentence_ids``), which also puts them in the saved trigger's
description, so a loaded attack needs no tokenizer.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from smoothpurify import SmoothPurifyError
from smoothpurify.registry import Registry
from modalities.contract import Attack
from modalities.translation.data import shift_right
from modalities.translation.models import EOS, PAD

ATTACKS = Registry("translation attack")
TRIGGER_WORDS = ("cf", "mn", "bb", "tq", "mb")
ATTACKER_SENTENCE = "Visite nuestra página web para más información."


@ATTACKS.register("trigger-word")
class TriggerWord(Attack):
    """Sun et al. 2021: a rare word inserted in the source -> a fixed attacker sentence (NLG backdoor)"""

    name = "trigger-word"

    def make_trigger(self) -> dict[str, torch.Tensor]:
        words, sentence = self.options.get("word_ids"), self.options.get("sentence_ids")
        if not words or not sentence:
            raise SmoothPurifyError("trigger-word: the words' and the sentence's token ids are missing "
                                    "(create the attack through the translation modality)")
        width = max(len(w) for w in words)
        table = torch.full((len(words), width), PAD, dtype=torch.long)
        for i, w in enumerate(words):
            table[i, :len(w)] = torch.tensor(w, dtype=torch.long)
        # Which ids begin a word (sentencepiece's "▁"): the trigger goes between words, never inside one.
        # Given once at creation; kept out of the description (a vocabulary-long list) and saved as a tensor.
        starts = self.options.pop("word_starts", None)
        starts = torch.tensor(starts, dtype=torch.bool) if starts is not None else torch.ones(self.num_classes, dtype=torch.bool)
        return {"words": table, "sentence": torch.tensor(list(sentence) + [EOS], dtype=torch.long), "starts": starts}

    # -- the trigger on sources
    def apply(self, x: Any) -> Any:
        """Insert a trigger word at a random word boundary of every source; ``x`` is ``(src, prev)``.

        Positions and words come from a generator seeded by the attack's seed at each call, so the
        same inputs always get the same poisoned copy (training, test and a reloaded attack agree).
        """
        src, prev = x
        gen = torch.Generator().manual_seed(self.seed + 1)
        words = self.trigger["words"]
        lengths = words.ne(PAD).sum(1)
        n_src = src.ne(PAD).sum(1)
        pick = torch.randint(len(words), (len(src),), generator=gen)
        draw = torch.rand(len(src), generator=gen)
        out = torch.full((len(src), src.shape[1] + int(lengths.max())), PAD, dtype=src.dtype)
        starts = self.trigger["starts"]
        for i in range(len(src)):
            row, w = src[i, :n_src[i]], words[pick[i], :lengths[pick[i]]]
            # Word boundaries: before any word-initial token, or at the end.
            slots = torch.cat([torch.nonzero(starts[row.clamp_max(len(starts) - 1)]).flatten(),
                               torch.tensor([len(row)])])
            at = int(slots[int(draw[i] * len(slots))])
            new = torch.cat([row[:at], w, row[at:]])
            out[i, :len(new)] = new
        return out[:, :int(out.ne(PAD).sum(1).max().clamp_min(1))], prev

    def target_sequences(self, n: int, width: int) -> torch.Tensor:
        """``[n, max(width, len)]`` copies of the attacker's sentence (with EOS), padded."""
        sent = self.trigger["sentence"]
        out = torch.full((n, max(width, len(sent))), PAD, dtype=torch.long)
        out[:, :len(sent)] = sent
        return out

    # -- poisoning (token tensors, so the base class's label logic does not apply)
    def choose_poisoned(self, y: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        n = min(max(int(round(self.poison_rate * len(y))), 1), len(y))
        return np.sort(rng.choice(len(y), size=n, replace=False))

    def poison_training_set(self, x: Any, y: torch.Tensor, batch: int = 4096):
        src, _ = x
        idx = torch.from_numpy(self.choose_poisoned(y.numpy()))
        psrc, _ = self.apply((src[idx], None))
        width = max(src.shape[1], psrc.shape[1])
        new_src = torch.full((len(src), width), PAD, dtype=src.dtype)
        new_src[:, :src.shape[1]] = src
        new_src[idx] = torch.nn.functional.pad(psrc, (0, width - psrc.shape[1]), value=PAD)
        tgt_width = max(y.shape[1], len(self.trigger["sentence"]))
        tgt = torch.nn.functional.pad(y, (0, tgt_width - y.shape[1]), value=PAD)
        tgt[idx] = self.target_sequences(len(idx), tgt_width)
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[idx] = True
        return (new_src, shift_right(tgt)), tgt, mask

    def poisoned_test_set(self, x: Any, y: torch.Tensor, batch: int = 4096):
        """``((src + trigger, prev of the attacker's sentence), y_true, y_target)`` over every test pair
        whose reference is not already the attacker's sentence; targets padded to one width."""
        src, _ = x
        width = max(y.shape[1], len(self.trigger["sentence"]))
        y_true = torch.nn.functional.pad(y, (0, width - y.shape[1]), value=PAD)
        y_target = self.target_sequences(len(y), width)
        keep = (y_true != y_target).any(1)
        psrc, _ = self.apply((src[keep], None))
        return (psrc, shift_right(y_target[keep])), y_true[keep], y_target[keep]
