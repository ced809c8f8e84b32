"""Unlearning reverse-engineered triggers: Neural Cleanse's mitigation (Wang et al., "Neural Cleanse:
Identifying and Mitigating Backdoor Attacks in Neural Networks", S&P 2019, Sec. VI-C), from the model
and clean data alone.

A backdoor to class ``t`` is a small change that sends any input to ``t``. Before tuning, for every
class ``t`` and every trigger family the defender searches the trigger of a fixed budget that sends the
most clean inputs of the other classes to ``t`` (``max_theta mean log p(t | apply(x, theta))``, Adam,
a few restarts). Within a budget that a natural class cannot use (a small cluster of points, a tilt),
the backdoor's target is the class the search reaches best; that class's trigger (one per family, the
*suspect*; all of them on a tie) is then laid on a share of each clean batch while tuning, and the tuned model is asked for
the clean answer (the true label, and the teacher's output on the clean input): the shortcut is
unlearnt where it is, instead of everywhere at random (the presets' overlay).

Unlike the scan (:mod:`smoothpurify.scan`), nothing is judged here: a defender who purifies assumes a
backdoor, and unlearning the most reachable class's trigger of a clean model costs little. What a
trigger is comes from the modality (:class:`BudgetedFamily`); nothing here knows a modality.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from smoothpurify import SmoothPurifyError
from smoothpurify.model import call_model
from smoothpurify.scan import frozen
from smoothpurify.training import index_inputs


class BudgetedFamily(Protocol):
    """Triggers whose parametrization keeps them within a fixed budget (no size term)."""

    def init(self, example: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Free parameters of a random trigger (unconstrained reals) for one input ``example``."""

    def apply(self, x: torch.Tensor, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch ``x`` with the trigger on it."""

    def describe(self, theta: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The trigger in input units, for the record (JSON-ready)."""


@dataclass
class InversionSettings:
    steps: int = 40          # Adam steps per restart
    restarts: int = 2        # random starts per class; the one sending most inputs to the class is kept
    batch_size: int = 32
    lr: float = 0.1


@dataclass
class InvertedTrigger:
    family: str
    target: int
    success: float                     # share of the other classes' clean inputs sent to ``target``
    theta: dict[str, torch.Tensor] = field(repr=False)
    successes: list[float] = field(default_factory=list)  # every class's best share (the search's evidence)

    def to_record(self, family: BudgetedFamily) -> dict[str, Any]:
        return {"family": self.family, "target": self.target, "success": round(self.success, 4),
                "per_class": [round(s, 4) for s in self.successes], "trigger": family.describe(self.theta)}


def _best_trigger(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, target: int,
                  family: BudgetedFamily, settings: InversionSettings,
                  generator: torch.Generator) -> tuple[tuple[float, float], dict[str, torch.Tensor]]:
    """``((share sent to target, their mean log-posterior of target), theta)`` of the restart that sends
    most (the surer one on a tie)."""
    others = torch.nonzero(targets != target).flatten()
    if len(others) == 0:
        raise SmoothPurifyError(f"trigger inversion: no clean inputs outside class {target}")
    goal = torch.full((settings.batch_size,), target, device=targets.device)
    best: tuple[tuple[float, float], dict[str, torch.Tensor]] = ((-1.0, -math.inf), {})
    for _ in range(settings.restarts):
        theta = {k: v.to(inputs.device).requires_grad_(True) for k, v in family.init(inputs[0], generator).items()}
        opt = torch.optim.Adam(list(theta.values()), lr=settings.lr)
        for _ in range(settings.steps):
            idx = others[torch.randint(len(others), (settings.batch_size,), generator=generator).to(others.device)]
            loss = nn.functional.cross_entropy(call_model(model, family.apply(index_inputs(inputs, idx), theta)), goal)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        theta = {k: v.detach() for k, v in theta.items()}
        hits, log_p = 0, 0.0
        with torch.no_grad():
            for idx in others.split(256):
                out = call_model(model, family.apply(index_inputs(inputs, idx), theta))
                hits += int((out.argmax(-1) == target).sum())
                log_p += float(out.log_softmax(-1)[:, target].sum())
        score = (hits / len(others), log_p / len(others))
        if score > best[0]:
            best = (score, theta)
    return best


def chosen_families(available: dict[str, BudgetedFamily], only: list[str] | None,
                    method: str) -> dict[str, BudgetedFamily]:
    """``available`` (the modality's families), or those of them named in ``only``; an unknown name is one error."""
    if only is None:
        return dict(available)
    unknown = sorted(set(only) - set(available))
    if unknown:
        raise SmoothPurifyError(f"{method}: unlearn_only names {', '.join(unknown)}, not a trigger family of this "
                                f"modality ({', '.join(available) or 'it has none'})")
    return {k: v for k, v in available.items() if k in only}


def invert_triggers(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, num_classes: int,
                    families: dict[str, BudgetedFamily], settings: InversionSettings | None = None, *,
                    generator: torch.Generator, progress: bool = True) -> list[InvertedTrigger]:
    """For each family, the trigger of the class that its budget reaches best (the suspect; every
    class tied at the best share), with every class's share as evidence. ``model`` is left as it was
    (eval mode and gradients off while searching)."""
    if not families:
        raise SmoothPurifyError("trigger inversion: this modality supplies no trigger family to unlearn "
                                "(the modality hook `unlearn_families`)")
    settings = settings or InversionSettings()
    was_training = model.training
    model.eval()
    found = []
    try:
        with frozen(model), tqdm(total=len(families) * num_classes, desc="invert triggers",
                                 disable=None if progress else True, leave=False) as bar:
            for name, family in families.items():
                per_class = []
                for t in range(num_classes):
                    per_class.append(_best_trigger(model, inputs, targets, t, family, settings, generator))
                    bar.update(1)
                # the class reached best; where several are reached equally (every input sent to each), all of them
                shares = [score[0] for score, _ in per_class]
                found += [InvertedTrigger(name, c, shares[c], per_class[c][1], shares)
                          for c in range(num_classes) if shares[c] == max(shares)]
    finally:
        model.train(was_training)
    return found


@dataclass
class TriggerViews:
    """Lays one of ``triggers`` (at random) on a share ``share`` of a batch (at random); the rest unchanged."""
    triggers: list[InvertedTrigger]
    families: dict[str, BudgetedFamily]
    share: float
    generator: torch.Generator

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        n = inputs.shape[0]
        chosen = torch.rand(n, generator=self.generator) < self.share
        which = torch.randint(len(self.triggers), (n,), generator=self.generator)
        out = inputs.clone()
        for k, trig in enumerate(self.triggers):
            rows = torch.nonzero(chosen & (which == k)).flatten().to(inputs.device)
            if len(rows):
                out[rows] = self.families[trig.family].apply(inputs[rows], trig.theta).to(out.dtype)
        return out


class BudgetedPatch:
    """Neural Cleanse's mask-and-pattern trigger within a fixed area: ``(1 - m) x + m p`` with one mask
    ``m`` over the last two axes (shared by channels and frames) whose total never exceeds ``share`` of
    the pixels (``sigmoid(a)``, scaled down when its sum would), and a pattern ``p = sigmoid(b)`` in the
    input range [0, 1]: one picture for every frame of a clip (``static``), or one per frame."""

    def __init__(self, share: float = 0.1, static: bool = False):
        self.share, self.static = share, static

    def init(self, example: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if example.dim() < 3:
            raise SmoothPurifyError("a patch trigger needs inputs shaped [..., C, H, W]")
        h, w = example.shape[-2:]
        shape = (example.shape[0], *[1] * (example.dim() - 3), h, w) if self.static else example.shape
        return {"mask": torch.randn(h, w, generator=generator) - 2.0, "pattern": torch.randn(shape, generator=generator)}

    def mask(self, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        m = torch.sigmoid(theta["mask"])
        budget = self.share * m.numel()
        return m * torch.clamp(budget / m.sum(), max=1.0)

    def apply(self, x: torch.Tensor, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        m = self.mask(theta).to(x)
        return (1 - m) * x + m * torch.sigmoid(theta["pattern"]).to(x)

    def describe(self, theta: dict[str, torch.Tensor]) -> dict[str, Any]:
        m = self.mask(theta).detach().cpu()
        rows, cols = torch.nonzero(m > 0.5, as_tuple=True)
        box = [int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())] if len(rows) else None
        return {"kind": "patch", "area": round(float(m.sum()), 1), "pixels_over_half": int(len(rows)),
                "box_rows_cols": box}
