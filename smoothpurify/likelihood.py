"""Per-sample likelihoods the core optimises and differentiates.

A likelihood turns model outputs and targets into a per-sample negative log-likelihood
``-log p(y_j | x_j)`` (shape ``[B]``) and can sample targets from the model (for the "true"
Fisher). The two below cover classification, token sequences and multi-label outputs; a modality
with another output structure supplies its own object with the same two methods.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Likelihood(Protocol):
    def nll(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample negative log-likelihood, shape ``[B]``."""

    def sample(self, outputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution (same shape as real targets)."""


class Categorical:
    """Softmax over the last dimension; extra dimensions (tokens) are summed per sample.

    ``outputs``: ``[B, C]`` or ``[B, T, C]``; ``targets``: ``[B]`` or ``[B, T]`` class indices.
    Positions equal to ``ignore_index`` (padding) contribute nothing.
    """

    def __init__(self, ignore_index: int | None = None):
        self.ignore_index = ignore_index

    def nll(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(outputs, dim=-1)
        safe = targets if self.ignore_index is None else targets.clamp_min(0)
        picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        if self.ignore_index is not None:
            picked = picked * (targets != self.ignore_index)
        return -picked.reshape(picked.shape[0], -1).sum(dim=1)

    def smoothed_nll(self, outputs: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
        """Cross-entropy against ``(1 - eps) * onehot(y) + eps / C`` (label smoothing, Szegedy et al.
        2016), per sample; a training loss, never the likelihood of the Fisher terms."""
        logp = F.log_softmax(outputs, dim=-1)
        uniform = -logp.mean(-1)
        if self.ignore_index is not None:
            uniform = uniform * (targets != self.ignore_index)
        return (1 - eps) * self.nll(outputs, targets) + eps * uniform.reshape(uniform.shape[0], -1).sum(dim=1)

    def distill(self, outputs: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                temperature: float) -> torch.Tensor:
        """Knowledge distillation (Hinton et al. 2015): ``T^2 KL(softmax(t/T) || softmax(s/T))`` per
        sample, summed over tokens; padding positions of ``targets`` contribute nothing."""
        log_s = F.log_softmax(outputs / temperature, dim=-1)
        log_t = F.log_softmax(teacher.detach() / temperature, dim=-1)
        per_position = (log_t.exp() * (log_t - log_s)).sum(-1)
        if self.ignore_index is not None:
            per_position = per_position * (targets != self.ignore_index)
        return temperature ** 2 * per_position.reshape(per_position.shape[0], -1).sum(dim=1)

    def sample(self, outputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        probs = F.softmax(outputs.detach(), dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


class Bernoulli:
    """Independent sigmoid per output unit (multi-label); log-likelihoods summed per sample."""

    def nll(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_unit = F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype), reduction="none")
        return per_unit.reshape(per_unit.shape[0], -1).sum(dim=1)

    def smoothed_nll(self, outputs: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
        """Binary cross-entropy against targets pulled towards 1/2 by ``eps`` (label smoothing)."""
        return self.nll(outputs, targets.to(outputs.dtype) * (1 - eps) + eps / 2)

    def distill(self, outputs: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                temperature: float) -> torch.Tensor:
        """``T^2`` times the summed Bernoulli KL of the teacher's tempered sigmoids from the student's."""
        soft = torch.sigmoid(teacher.detach() / temperature)
        per_unit = (F.binary_cross_entropy_with_logits(outputs / temperature, soft, reduction="none")
                    - F.binary_cross_entropy_with_logits(teacher.detach() / temperature, soft, reduction="none"))
        return temperature ** 2 * per_unit.reshape(per_unit.shape[0], -1).sum(dim=1)

    def sample(self, outputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        probs = torch.sigmoid(outputs.detach())
        return torch.bernoulli(probs, generator=generator)
