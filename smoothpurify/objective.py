"""The purification objective: ``NLL + eta_F * Tr(F) + eta_r / 2 * L_r``, each term optional.

SFT paper Eq. 6 (full) and Eq. 7 (spectral shifts); NGF uses NLL + the anchor only.

* NLL: the modality's per-sample negative log-likelihood, batch mean.
* ``Tr(F)``: mean squared norm of per-sample gradients over the tuned parameters, on the current
  mini-batch, differentiable; added every ``trace_every`` steps (SFT A.5.2: 10).
* ``L_r = sum_i diag(Fbar)_i (theta_i - thetabar_i)^2`` with ``Fbar`` the Fisher diagonal at the
  start point on the clean validation set (computed once, fixed) and ``thetabar`` the start values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from smoothpurify.likelihood import Likelihood
from smoothpurify.model import call_model

TraceFn = Callable[..., torch.Tensor]


def anchor_penalty(params: dict[str, torch.Tensor], fisher_diag: dict[str, torch.Tensor],
                   anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``L_r``: Fisher-weighted squared distance of the tuned parameters from their start values."""
    terms = [(fisher_diag[n] * (p - anchor[n]).pow(2)).sum() for n, p in params.items()]
    return torch.stack(terms).sum()


@dataclass
class Objective:
    likelihood: Likelihood
    trace_weight: float = 0.0
    trace_every: int = 10
    trace_fn: TraceFn | None = None
    anchor_weight: float = 0.0
    fisher_diag: dict[str, torch.Tensor] = field(default_factory=dict)
    anchor: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(self, model: nn.Module, params: dict[str, torch.Tensor], inputs: Any,
                 targets: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss for this step, and its parts (floats) for the record."""
        nll = self.likelihood.nll(call_model(model, inputs), targets).mean()
        total, parts = nll, {"nll": float(nll.detach())}
        if self.trace_weight > 0 and step % self.trace_every == 0:
            trace = self.trace_fn(model, inputs, targets, self.likelihood, params)
            total = total + self.trace_weight * trace
            parts["trace_f"] = float(trace.detach())
        if self.anchor_weight > 0:
            penalty = anchor_penalty(params, self.fisher_diag, self.anchor)
            total = total + 0.5 * self.anchor_weight * penalty
            parts["anchor"] = float(penalty.detach())
        return total, parts
