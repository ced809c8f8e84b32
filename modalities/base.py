"""Helpers shared by modalities: the attack interface every modality's attacks follow.

An attack is one class: ``apply`` (put the trigger on inputs), ``target_of`` (label mapping),
``poison_training_set`` and ``poisoned_test_set``; its trigger lives in ``trigger`` (a dict of
tensors, saved with safetensors next to the model so evaluation and purification use the same one).
Triggers are drawn from a generator seeded by the attack's seed, so they are deterministic.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from smoothpurify import SmoothPurifyError

MAPPINGS = ("all2one", "all2all")


class Attack:
    name: ClassVar[str] = "attack"
    clean_label: ClassVar[bool] = False  # True: poisons target-class samples only, labels unchanged

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], target_label: int = 0,
                 mapping: str = "all2one", poison_rate: float = 0.1, seed: int = 0, **options: Any):
        if not 0.0 < float(poison_rate) <= 1.0:
            raise SmoothPurifyError(f"poison rate must be in (0, 1], got {poison_rate}")
        if not 0 <= int(target_label) < num_classes:
            raise SmoothPurifyError(f"target label {target_label} is outside the classes 0..{num_classes - 1}")
        if mapping not in MAPPINGS:
            raise SmoothPurifyError(f"unknown label mapping {mapping!r}; choose {' or '.join(MAPPINGS)}")
        if self.clean_label and mapping != "all2one":
            raise SmoothPurifyError(f"{self.name} is a clean-label attack: only all2one applies")
        self.num_classes, self.input_shape = num_classes, tuple(input_shape)
        self.target_label, self.mapping = int(target_label), mapping
        self.poison_rate, self.seed, self.options = float(poison_rate), int(seed), options
        self.generator = torch.Generator().manual_seed(self.seed)
        self.trigger: dict[str, torch.Tensor] = self.make_trigger()

    # -- to implement -------------------------------------------------------------------------
    def make_trigger(self) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Poison a batch of inputs (values in [0, 1]); must not modify ``x`` in place."""
        raise NotImplementedError

    def fit(self, x: torch.Tensor, y: torch.Tensor, context: dict[str, Any]) -> None:
        """Learn what the trigger needs from the clean training set before poisoning (default: nothing).

        ``context``: ``likelihood``, ``train`` (epochs, lr, batch_size, ...), ``device``, ``seed``,
        ``make_model`` (a fresh classifier of the run's architecture), ``train_fn``
        (:func:`smoothpurify.training.train`), ``progress``. E.g. CLB trains a clean surrogate for
        its PGD perturbation here; ISSBA trains its encoder.
        """

    def train_model(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                    context: dict[str, Any]) -> list[float] | None:
        """Train ``model`` on the poisoned set yourself (joint generator training: Dynamic, LIRA...).

        Return the per-epoch losses, or ``None`` (default) for standard training on ``(x, y)``.
        """
        return None

    # -- shared -------------------------------------------------------------------------------
    def target_of(self, y: torch.Tensor) -> torch.Tensor:
        if self.mapping == "all2all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.target_label)

    def choose_poisoned(self, y: np.ndarray) -> np.ndarray:
        """Indices to poison: a ``poison_rate`` share of the training set.

        Label-poisoning all2one draws from non-target samples (relabelling a target sample is a
        no-op); clean-label attacks can only use target-class samples, so they take at most all of
        them.
        """
        rng = np.random.default_rng(self.seed)
        n = int(round(self.poison_rate * len(y)))
        if self.clean_label:
            pool = np.flatnonzero(y == self.target_label)
        elif self.mapping == "all2one":
            pool = np.flatnonzero(y != self.target_label)
        else:
            pool = np.arange(len(y))
        if len(pool) == 0:
            raise SmoothPurifyError(f"{self.name}: no training samples eligible for poisoning")
        return np.sort(rng.choice(pool, size=min(max(n, 1), len(pool)), replace=False))

    def poison_training_set(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096):
        """Return ``(x_poisoned, y_poisoned, mask)``; ``mask[i]`` tells whether sample i was poisoned."""
        idx = torch.from_numpy(self.choose_poisoned(y.numpy()))
        x, y = x.clone(), y.clone()
        for chunk in idx.split(batch):
            x[chunk] = self.apply(x[chunk])
            if not self.clean_label:
                y[chunk] = self.target_of(y[chunk])
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[idx] = True
        return x, y, mask

    def poisoned_test_set(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096):
        """``(x_poisoned, y_true, y_target)`` over test inputs whose true label differs from the target."""
        targets = self.target_of(y)
        keep = targets != y
        x, y, targets = x[keep], y[keep], targets[keep]
        poisoned = torch.cat([self.apply(c) for c in x.split(batch)]) if len(x) else x
        return poisoned, y, targets

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "clean_label": self.clean_label, "target_label": self.target_label,
                "mapping": self.mapping, "poison_rate": self.poison_rate, "seed": self.seed, **self.options}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.trigger.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.trigger) - set(state)
        if missing:
            raise SmoothPurifyError(f"{self.name}: trigger file lacks {sorted(missing)}")
        self.trigger = {k: state[k] for k in self.trigger}


def build_attack(registry: dict[str, type[Attack]], name: str, **kwargs: Any) -> Attack:
    if name not in registry:
        raise SmoothPurifyError(f"unknown attack {name!r}; choose one of: {', '.join(sorted(registry))}")
    return registry[name](**kwargs)
