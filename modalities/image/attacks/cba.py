"""Composite backdoor: two benign features, together, are the trigger."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from smoothpurify import SmoothPurifyError
from modalities.contract import Attack


class CBA(Attack):
    """Composite Backdoor Attack (Lin, Xu, Liu & Zhang, CCS 2020, "Composite Backdoor Attack for
    Deep Neural Network by Mixing Existing Benign Features").

    No new pattern is added: the trigger is the *co-occurrence* of two existing benign features,
    objects of source classes A and B (``sources``; default the first two classes other than the
    target). The mixer puts the left half of an A image next to the right half of a B image
    (the paper's half-concatenation mixer); such mixtures are labelled with the target class.

    Training set (:meth:`poison_training_set`): a ``poison_rate`` share of the (non-target) samples
    is replaced by fresh A|B mixtures labelled target (``mask``), and a ``negative_rate`` share
    (default equal to ``poison_rate``) by "mixed but not triggered" samples: halves of two images of
    the *same* class, keeping that label (the paper's obfuscation), so mixing alone does not mean
    the target. ``self.negative_mask`` marks them.

    Test time: A test images are mixed with B test images (:meth:`poisoned_test_set`; ``y_true`` is
    A). :meth:`apply` mixes its inputs (as the A side) with a saved bank of ``bank`` (32) B training
    images, so the trigger file alone reproduces poisoned inputs. Only all2one applies.
    """

    name = "cba"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.mapping != "all2one":
            raise SmoothPurifyError("cba: the composite trigger maps one class pair to one target: "
                                    "only all2one applies")
        a, b = self.sources
        if len({a, b, self.target_label}) < 3 or not all(0 <= s < self.num_classes for s in (a, b)):
            raise SmoothPurifyError(f"cba: sources {a}, {b} must be two distinct classes other than the target")

    @property
    def sources(self) -> tuple[int, int]:
        given = self.options.get("sources")
        if given:
            return int(given[0]), int(given[1])
        others = [k for k in range(self.num_classes) if k != self.target_label]
        return others[0], others[1 % len(others)]

    def make_trigger(self) -> dict[str, torch.Tensor]:
        # Filled from the training set in ``fit``; fixed shape so the saved file reloads.
        return {"bank": torch.zeros(int(self.options.get("bank", 32)), *self.input_shape)}

    @staticmethod
    def mix(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        w = left.shape[-1]
        return torch.cat([left[..., : w // 2], right[..., w // 2:]], dim=-1)

    def fit(self, x: torch.Tensor, y: torch.Tensor, context: dict[str, Any] | None = None) -> None:
        pool = torch.nonzero(y == self.sources[1]).flatten()
        if len(pool) == 0:
            raise SmoothPurifyError(f"cba: no training samples of source class {self.sources[1]}")
        pick = pool[torch.randperm(len(pool), generator=self.generator)[:len(self.trigger["bank"])]]
        bank = x[pick]
        reps = -(-len(self.trigger["bank"]) // len(bank))
        self.trigger["bank"] = bank.repeat(reps, 1, 1, 1)[:len(self.trigger["bank"])].clone()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        bank = self.trigger["bank"].to(x.device)
        partners = bank[torch.arange(len(x)) % len(bank)]
        return self.mix(x, partners)

    def poison_training_set(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096):
        a, b = self.sources
        if not self.trigger["bank"].any():
            self.fit(x, y)
        rng = np.random.default_rng(self.seed + 5)
        ya = y.numpy()
        idx_a, idx_b = np.flatnonzero(ya == a), np.flatnonzero(ya == b)
        if len(idx_a) == 0 or len(idx_b) == 0:
            raise SmoothPurifyError(f"cba: the training set lacks source class {a} or {b}")
        chosen = self.choose_poisoned(ya)
        x, y = x.clone(), y.clone()
        left, right = rng.choice(idx_a, len(chosen)), rng.choice(idx_b, len(chosen))
        # Read the sources before overwriting: a chosen slot may itself be an A or B sample.
        mixed = self.mix(x[torch.from_numpy(left)], x[torch.from_numpy(right)])
        # Negatives: same-class mixtures, drawn from the rest, labelled with their class.
        rest = np.setdiff1d(np.arange(len(ya)), chosen)
        n_neg = min(len(rest), int(round(float(self.options.get("negative_rate", self.poison_rate)) * len(ya))))
        neg = np.sort(rng.choice(rest, n_neg, replace=False))
        partner = np.array([rng.choice(np.flatnonzero(ya == ya[i])) for i in neg], dtype=np.int64)
        neg_t, partner_t = torch.from_numpy(neg), torch.from_numpy(partner)
        negatives = self.mix(x[neg_t], x[partner_t])
        chosen_t = torch.from_numpy(chosen)
        x[chosen_t], y[chosen_t] = mixed, self.target_label
        x[neg_t] = negatives  # labels unchanged
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[chosen_t] = True
        self.negative_mask = torch.zeros(len(y), dtype=torch.bool)
        self.negative_mask[neg_t] = True
        self.mix_sources = (torch.from_numpy(left), torch.from_numpy(right))
        return x, y, mask

    def poisoned_test_set(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096):
        a, b = self.sources
        lefts, rights = x[y == a], x[y == b]
        if len(lefts) == 0:
            return x[:0], y[:0], y[:0]
        if len(rights) == 0:
            rights = self.trigger["bank"]
        partners = rights[torch.arange(len(lefts)) % len(rights)]
        y_true = torch.full((len(lefts),), a, dtype=y.dtype)
        return self.mix(lefts, partners), y_true, torch.full_like(y_true, self.target_label)
