"""The per-sample family of the backdoor scan: how far each clean input is from a class, one by one.

Neural Cleanse's families (:mod:`smoothpurify.scan`) ask for one trigger that moves *every* input to a
class; this one asks, for each input alone, for the smallest L2 perturbation that sends it to the class
(a minimal targeted adversarial example), and takes the median over inputs as the class's size. A
backdoor teaches a direction that reaches its target from anywhere, so the target's per-sample distance
is small too (on the WaNet model of the smoke benchmark the target is at half the other classes' median
distance, where no universal trigger finds it); but natural hubs are near as well, so on a received
model alone the family is weak. Its use is in *what a purification removed* (``pipeline.scan.removal``):
the received model's distances against the purified model's, where a hub is near in both and the
removed backdoor's target moves away (README, "Backdoor scan", the per-sample family).

The search is DDN (Rony et al., "Decoupled Direction and Norm for Efficient Gradient-Based L2
Adversarial Attacks and Defenses", CVPR 2019): a normalised gradient step on the targeted
cross-entropy, then a projection onto the sphere of radius ``eps_i``, which shrinks while the input
reaches the target and grows while it does not.
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


def min_norms(model: nn.Module, x: torch.Tensor, target: int, steps: int = 100, gamma: float = 0.05,
              eps0: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input, the smallest L2 norm of a perturbation that made ``model`` predict ``target`` (inf if
    none did) and that perturbation (zero if none). The step size decays from 1 to 0.01 (cosine); no
    clamping to the input range, like the scan's universal additive family."""
    n = x.shape[0]
    view = (n,) + (1,) * (x.dim() - 1)
    delta, eps = torch.zeros_like(x), torch.full((n,), eps0, device=x.device)
    best, goal = torch.full((n,), math.inf, device=x.device), torch.full((n,), target, device=x.device)
    best_delta = torch.zeros_like(x)

    def keep_best(logits: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        nonlocal best, best_delta
        hit = logits.argmax(-1) == goal
        norm = d.flatten(1).norm(dim=1)
        better = hit & (norm < best)
        best = torch.where(better, norm, best)
        best_delta = torch.where(better.view(view), d, best_delta)
        return hit

    for k in range(steps):
        alpha = 0.01 + 0.99 * (1 + math.cos(math.pi * k / steps)) / 2
        delta.requires_grad_(True)
        logits = call_model(model, x + delta)
        grad, = torch.autograd.grad(nn.functional.cross_entropy(logits, goal, reduction="sum"), delta)
        with torch.no_grad():
            hit = keep_best(logits, delta.detach())
            eps = torch.where(hit, eps * (1 - gamma), eps * (1 + gamma))
            delta = delta - alpha * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
            delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).view(view)
    with torch.no_grad():
        keep_best(call_model(model, x + delta), delta)
    return best, best_delta


@dataclass
class PerSample:
    """Per class, the median over ``inputs`` clean inputs of other classes (drawn with the scan's seed)
    of their minimal L2 distance to the class (:func:`min_norms`, the settings' ``per_sample_steps``)."""
    inputs: int = 64

    def scan(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, num_classes: int,
             settings: ScanSettings, *, seed: int = 0, device: str = "cpu", progress: bool = True) -> ScanResult:
        t0 = time.perf_counter()
        model = model.to(device).eval()
        gen = torch.Generator().manual_seed(seed)
        triggers = []
        with frozen(model):
            for t in tqdm(range(num_classes), desc="scan: per-sample", disable=None if progress else True, leave=False):
                others = torch.nonzero(targets.cpu() != t).flatten()
                idx = others[torch.randperm(len(others), generator=gen)[:self.inputs]]
                if len(idx) == 0:  # no clean input outside class t: nothing to measure
                    blank = torch.zeros_like(inputs[0]).cpu()
                    triggers.append(ClassTrigger(t, math.inf, 0.0, {"delta": blank, "trigger": blank + 0.5}))
                    continue
                norms, deltas = min_norms(model, inputs[idx].to(device), t, settings.per_sample_steps)
                size = float(norms.median().cpu())   # torch's median of an even count: the lower middle
                reached = float(torch.isfinite(norms).float().mean())
                # the picture: the perturbation of the input at the median (any reached one if the median is inf)
                i = int((norms - size).abs().argmin()) if math.isfinite(size) else int(norms.argmin())
                d = deltas[i].detach().cpu()
                picture = {"delta": d, "trigger": 0.5 + d / (2 * d.abs().max().clamp_min(1e-12))}
                triggers.append(ClassTrigger(t, size, reached, picture))
        return ScanResult.judged(triggers, settings.threshold, time.perf_counter() - t0)
