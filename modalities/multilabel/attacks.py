"""The clean-image backdoor of Chen et al., "Clean-image Backdoor: Attacking Multi-label Models with
Poisoned Labels Only" (ICLR 2023): images are never modified; the trigger is a set of categories
appearing together, and every training image that holds the whole set gets poisoned labels.

Three goals (their §3): ``hiding`` (the target category disappears from the labels), ``appearing``
(the target category is added) and ``misclassification`` (the ``source`` category is replaced by
the target). The poison rate is therefore not drawn: it is the share of training images that hold
the trigger set (and whose labels the goal changes). Chen et al. pick trigger sets that occur in
about 5 % of VOC images (1.5 % on COCO); the mosaics' default trigger occurs in about 5 %.

Targets are multi-hot ``[N, C]`` float tensors. The poisoned test set is the test images that hold
the trigger set and whose labels the goal changes; the attack succeeds on an image when every label
the goal changes is predicted as the attacker wants (logit > 0 means present).
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from smoothpurify import SmoothPurifyError
from smoothpurify.registry import Registry
from modalities.contract import Attack

ATTACKS = Registry("attack")


class CooccurrenceAttack(Attack):
    """Base of the three goals; ``trigger``: the category ids that must all be present."""

    goal: ClassVar[str] = ""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], target_label: int = 0,
                 mapping: str = "all2one", poison_rate: float = 0.05, seed: int = 0,
                 trigger: list[int] | None = None, source: int | None = None, **options: Any):
        if mapping != "all2one":
            raise SmoothPurifyError(f"{self.name}: the clean-image attack has one target category (all2one)")
        cats = sorted({int(c) for c in (trigger or [])})
        if len(cats) < 2:
            raise SmoothPurifyError(f"{self.name}: attack.options.{self.name}.trigger must list at least two "
                                    f"categories, got {trigger}")
        if any(not 0 <= c < num_classes for c in cats):
            raise SmoothPurifyError(f"{self.name}: trigger categories {cats} are outside 0..{num_classes - 1}")
        if int(target_label) in cats:
            raise SmoothPurifyError(f"{self.name}: the target category {target_label} is part of the trigger {cats}")
        if self.goal == "misclassification":
            if source is None or not 0 <= int(source) < num_classes or int(source) in cats or int(source) == int(target_label):
                raise SmoothPurifyError(f"{self.name}: attack.options.{self.name}.source must be a category outside the "
                                        f"trigger and other than the target, got {source}")
            options["source"] = int(source)
        self.categories = cats
        super().__init__(num_classes, input_shape, target_label, mapping, poison_rate, seed, trigger=cats, **options)

    def make_trigger(self) -> dict[str, torch.Tensor]:
        return {"categories": torch.tensor(self.categories, dtype=torch.int64)}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x  # clean-image attack: the images are the trigger's carriers, never changed

    def has_trigger(self, y: torch.Tensor) -> torch.Tensor:
        return (y[:, self.trigger["categories"]] > 0.5).all(dim=1)

    def target_of(self, y: torch.Tensor) -> torch.Tensor:
        """The attacker's labels for images holding the trigger set; other rows are unchanged."""
        out = y.clone()
        rows = self.has_trigger(y)
        t = self.target_label
        if self.goal == "hiding":
            out[rows, t] = 0.0
        elif self.goal == "appearing":
            out[rows, t] = 1.0
        else:
            moved = rows & (y[:, self.options["source"]] > 0.5)
            out[moved, self.options["source"]] = 0.0
            out[moved, t] = 1.0
        return out

    def changed(self, y: torch.Tensor) -> torch.Tensor:
        return (self.target_of(y) != y).any(dim=1)

    def choose_poisoned(self, y: np.ndarray) -> np.ndarray:
        """Every training image whose labels the goal changes (Chen et al. poison all of them)."""
        idx = np.flatnonzero(self.changed(torch.as_tensor(y)).numpy())
        if len(idx) == 0:
            raise SmoothPurifyError(f"{self.name}: no training image holds the trigger set {self.categories}")
        return idx

    def poisoned_test_set(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096):
        keep = self.changed(y)
        return x[keep], y[keep], self.target_of(y)[keep]


@ATTACKS.register("hiding")
class Hiding(CooccurrenceAttack):
    """Chen et al. 2023, object disappearing: images holding the trigger set lose the target category."""

    name = "hiding"
    goal = "hiding"


@ATTACKS.register("appearing")
class Appearing(CooccurrenceAttack):
    """Chen et al. 2023, object appearing: images holding the trigger set gain the target category."""

    name = "appearing"
    goal = "appearing"


@ATTACKS.register("misclassification")
class Misclassification(CooccurrenceAttack):
    """Chen et al. 2023, misclassification: with the trigger set, the source category becomes the target."""

    name = "misclassification"
    goal = "misclassification"


def attack_success(logits: torch.Tensor, y_true: torch.Tensor, y_target: torch.Tensor) -> float:
    """ASR: share of poisoned test images where every label the goal changes is predicted as the
    attacker wants."""
    if len(y_true) == 0:
        return float("nan")
    goal = y_target != y_true
    hit = ((logits > 0).to(y_target.dtype) == y_target) | ~goal
    return float(hit.all(dim=1).float().mean())
