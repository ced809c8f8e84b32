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

    # Optional: ``grid(example) -> list[theta]``, a coarse grid over a low-dimensional budget (a tilt's three
    # angles). With ``InversionSettings.grid`` each class's first restart starts at the grid's best for it.


@dataclass
class InversionSettings:
    steps: int = 40          # Adam steps per restart
    restarts: int = 2        # random starts per class; the one sending most inputs to the class is kept
    batch_size: int = 32
    lr: float = 0.1
    grid: bool = False       # start each class's first restart at the family's grid point that suits it best


@dataclass
class InvertedTrigger:
    family: str
    target: int
    success: float                     # share of the other classes' clean inputs sent to ``target``
    theta: dict[str, torch.Tensor] = field(repr=False)
    successes: list[float] = field(default_factory=list)  # every class's best share (the search's evidence)
    epoch: int = 1                     # the tuning epoch at whose start it was found

    def to_record(self, family: BudgetedFamily) -> dict[str, Any]:
        return {"family": self.family, "target": self.target, "epoch": self.epoch, "success": round(self.success, 4),
                "per_class": [round(s, 4) for s in self.successes], "trigger": family.describe(self.theta)}


def _best_trigger(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, target: int,
                  family: BudgetedFamily, settings: InversionSettings,
                  generator: torch.Generator, start: dict[str, torch.Tensor] | None = None
                  ) -> tuple[tuple[float, float], dict[str, torch.Tensor]]:
    """``((share sent to target, their mean log-posterior of target), theta)`` of the restart that sends
    most (the surer one on a tie); the first restart starts at ``start`` where given."""
    others = torch.nonzero(targets != target).flatten()
    if len(others) == 0:
        raise SmoothPurifyError(f"trigger inversion: no clean inputs outside class {target}")
    goal = torch.full((settings.batch_size,), target, device=targets.device)
    best: tuple[tuple[float, float], dict[str, torch.Tensor]] = ((-1.0, -math.inf), {})
    for restart in range(settings.restarts):
        first = start if restart == 0 and start is not None else family.init(inputs[0], generator)
        theta = {k: v.detach().clone().to(inputs.device).requires_grad_(True) for k, v in first.items()}
        opt = torch.optim.Adam(list(theta.values()), lr=settings.lr)
        for _ in range(settings.steps):
            idx = others[torch.randint(len(others), (settings.batch_size,), generator=generator).to(others.device)]
            loss = nn.functional.cross_entropy(call_model(model, family.apply(index_inputs(inputs, idx), theta)), goal)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        theta = {k: v.detach() for k, v in theta.items()}
        score = _scores(model, inputs, targets, family, theta)[target]
        if score > best[0]:
            best = (score, theta)
    return best


def _scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, family: BudgetedFamily,
            theta: dict[str, torch.Tensor]) -> list[tuple[float, float]]:
    """For every class ``t``: (share of the inputs outside ``t`` that the trigger sends to ``t``, their mean
    log-posterior of ``t``)."""
    log_p = []
    with torch.no_grad():
        for idx in torch.arange(len(targets), device=targets.device).split(256):
            log_p.append(call_model(model, family.apply(index_inputs(inputs, idx), theta)).log_softmax(-1).float())
    log_p = torch.cat(log_p)
    hit = nn.functional.one_hot(log_p.argmax(-1), log_p.shape[-1]).bool()
    out = []
    for t in range(log_p.shape[-1]):
        others = targets != t
        n = max(int(others.sum()), 1)
        out.append((int(hit[others, t].sum()) / n, float(log_p[others, t].sum()) / n))
    return out


def _grid_starts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, family: BudgetedFamily,
                 num_classes: int, progress: bool) -> list[dict[str, torch.Tensor] | None]:
    """Per class, the point of the family's grid that sends most other inputs to it (None: no grid)."""
    if not hasattr(family, "grid"):
        return [None] * num_classes
    points = family.grid(inputs[0])
    scored = [_scores(model, inputs, targets, family, {k: v.to(inputs.device) for k, v in theta.items()})
              for theta in tqdm(points, desc="trigger grid", leave=False, disable=None if progress else True)]
    return [points[max(range(len(points)), key=lambda g: scored[g][t])] for t in range(num_classes)]


def search_epochs(epochs: int, rounds: int) -> list[int]:
    """The epochs (from 1) at whose start the families are searched: the tuning cut into ``rounds`` equal
    parts. A later search looks at the model being tuned, so it finds what the earlier triggers left of the
    backdoor (another angle or place that still works), and its triggers join the earlier ones."""
    parts = max(1, min(rounds, epochs))
    return [1 + (r * epochs) // parts for r in range(parts)]


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
                    generator: torch.Generator, progress: bool = True, epoch: int = 1) -> list[InvertedTrigger]:
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
                starts = (_grid_starts(model, inputs, targets, family, num_classes, progress) if settings.grid
                          else [None] * num_classes)
                for t in range(num_classes):
                    per_class.append(_best_trigger(model, inputs, targets, t, family, settings, generator, starts[t]))
                    bar.update(1)
                # the class reached best; where several are reached equally (every input sent to each), all of them
                shares = [score[0] for score, _ in per_class]
                found += [InvertedTrigger(name, c, shares[c], per_class[c][1], shares, epoch)
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
