"""The maximum-margin statistic of a class, a backdoor scan that assumes no trigger shape: MM-BD (Wang,
Xiang, Miller and Kesidis, "MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary Backdoor
Pattern Types Using a Maximum Margin Statistic", IEEE S&P 2024).

A backdoor teaches the network a feature that, present, outweighs every natural one: the target's
logit can be pushed far above all others, further than any natural class's can. So for every class
``t`` the scan maximises the margin over the input domain,

    r_t = max_x  z_t(x) - max_{j != t} z_j(x),     x in the box [lo, hi] of the clean inputs,

by gradient ascent from several random starts (``x = lo + (hi - lo) sigmoid(u)``), and the target is the
class whose ``r_t`` is an outlier *above* the others. Unlike Neural Cleanse nothing is assumed of how a
trigger is embedded (patch, blend, warp, input-specific), and no clean input is used, only its range.

The outlier test is the scan's own (:func:`smoothpurify.scan.anomaly_index` on logs, flag above the
threshold), so the three families share one score and one threshold: the "size" handed to it is
``1 / r_t`` (a margin twice the median's is as anomalous as a trigger half the median's); a class
whose margin stays at or below zero counts as unreached. The paper fits a null density to the other
classes' statistics instead; we keep one robust score for every family.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from smoothpurify.model import call_model
from smoothpurify.scan import ClassTrigger, ScanResult, ScanSettings, frozen


def margin(logits: torch.Tensor, target: int) -> torch.Tensor:
    """``z_t - max_{j != t} z_j`` per row."""
    others = logits.clone()
    others[:, target] = -math.inf
    return logits[:, target] - others.max(dim=1).values


class MarginResult(ScanResult):
    """A :class:`ScanResult` whose record also gives the margins themselves (``sizes`` are their inverses)."""

    def to_record(self) -> dict:
        margins = [1 / t.size if math.isfinite(t.size) else None for t in self.triggers]
        return {**super().to_record(), "margins": margins}

    def value_label(self, cls: int) -> str:
        return f"margin {1 / self.triggers[cls].size:.3g}"


@dataclass
class MaxMargin:
    """MM-BD's statistic per class. The scan settings' ``margin_steps`` of Adam (``lr`` on the unconstrained
    ``u``) from ``starts`` random inputs; the largest margin any start reached is the class's statistic."""
    starts: int = 16
    lr: float = 0.1

    def class_margin(self, model: nn.Module, lo: torch.Tensor, hi: torch.Tensor, shape: tuple[int, ...],
                     target: int, generator: torch.Generator, steps: int) -> tuple[float, torch.Tensor]:
        u0 = torch.rand((self.starts, *shape), generator=generator).clamp(0.01, 0.99)
        u = torch.logit(u0).to(lo.device).requires_grad_(True)
        opt = torch.optim.Adam([u], lr=self.lr)
        for _ in range(steps):
            m = margin(call_model(model, lo + (hi - lo) * torch.sigmoid(u)), target)
            opt.zero_grad(set_to_none=True)
            (-m.sum()).backward()
            opt.step()
        with torch.no_grad():
            x = lo + (hi - lo) * torch.sigmoid(u)
            m = margin(call_model(model, x), target)
        best = int(m.argmax())
        return float(m[best]), x[best].detach().cpu()

    def scan(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, num_classes: int,
             settings: ScanSettings, *, seed: int = 0, device: str = "cpu", progress: bool = True) -> ScanResult:
        """One :class:`MarginResult` (``size`` = 1 / margin, ``picture`` the maximising input)."""
        t0 = time.perf_counter()
        model = model.to(device).eval()
        lo = inputs.min().to(device)
        hi = inputs.max().to(device)
        if not float(hi) > float(lo):
            hi = lo + 1.0  # constant clean inputs: search the unit box above them
        gen = torch.Generator().manual_seed(seed)
        triggers = []
        with frozen(model):
            for t in tqdm(range(num_classes), desc="scan: margins", disable=None if progress else True, leave=False):
                r, x = self.class_margin(model, lo, hi, tuple(inputs.shape[1:]), t, gen, settings.margin_steps)
                size = 1.0 / r if r > 0 else math.inf
                picture = {"input": x, "trigger": (x - lo.cpu()) / (hi - lo).cpu()}
                triggers.append(ClassTrigger(t, size, 1.0 if r > 0 else 0.0, picture))
        return MarginResult.judged(triggers, settings.threshold, time.perf_counter() - t0)
