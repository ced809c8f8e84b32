"""Training losses of the multi-label models, as likelihood-like objects (``nll`` per sample).

Purification and the Fisher terms always use :class:`smoothpurify.likelihood.Bernoulli` (the sum of
per-label Bernoulli NLLs); ASL is only how the benign and backdoored models are trained.
"""
from __future__ import annotations

import torch

from smoothpurify.likelihood import Bernoulli


class AsymmetricLoss(Bernoulli):
    """ASL (Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021, Eq. 1-4).

    With ``p = sigmoid(z)`` and the shifted probability ``p_m = max(p - m, 0)`` for negatives:
    ``L+ = -(1 - p)^gamma_pos log(p)``, ``L- = -p_m^gamma_neg log(1 - p_m)``, summed over labels
    per sample. ``gamma_pos = gamma_neg = m = 0`` is plain binary cross-entropy. The focusing
    weights keep their gradient (the paper's formula; no detach). ``sample`` is the Bernoulli one.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8):
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = float(gamma_neg), float(gamma_pos), float(clip), eps

    def nll(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = targets.to(outputs.dtype)
        p = torch.sigmoid(outputs)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        # log-sigmoid keeps large logits finite; the clipped branch needs the plain log.
        log_pos = torch.nn.functional.logsigmoid(outputs)
        log_neg = torch.log((1 - p_neg).clamp(min=self.eps)) if self.clip > 0 else torch.nn.functional.logsigmoid(-outputs)
        pos = (1 - p).pow(self.gamma_pos) * log_pos if self.gamma_pos else log_pos
        neg = p_neg.pow(self.gamma_neg) * log_neg if self.gamma_neg else log_neg
        per_label = -(y * pos + (1 - y) * neg)
        return per_label.reshape(len(per_label), -1).sum(dim=1)
