"""The purification objective: ``NLL + eta_F * Tr(F) + eta_r / 2 * L_r``, each term optional.

SFT paper Eq. 6 (full) and Eq. 7 (spectral shifts); NGF uses NLL + the anchor only.

* NLL: the modality's per-sample negative log-likelihood, batch mean.
* ``Tr(F)``: mean squared norm of per-sample gradients over the tuned parameters, on the current
  mini-batch, differentiable; added every ``trace_every`` steps (SFT A.5.2: 10).
* ``L_r = sum_i diag(Fbar)_i (theta_i - thetabar_i)^2`` with ``Fbar`` the Fisher diagonal at the
  start point on the clean validation set (computed once, fixed) and ``thetabar`` the start values.
* With ``trace_step_bound`` the trace term's weight is scaled down, on the steps that compute it, so
  that its gradient is no longer than the NLL's (``min(1, ||dNLL|| / ||eta_F dTr(F)||)``): the exact
  Tr(F) of a backdoored model has a gradient ~20x the NLL's at eta_F = 1e-3, and an SGD step along
  it overshoots (README, "SFT that does not diverge").
* ``<W_c, W_c^orig>``: FST's feature-shift term (Min et al., NeurIPS 2023, Eq. 3): the inner product
  of the (re-initialised) classifier weight with the backdoored model's, minimised so that the new
  classifier, and through it the features, move away from the backdoored ones.
* ``KD``: knowledge distillation from the model as received, frozen, on the same (augmented) clean
  batch (``Likelihood.distill``, weight ``distill_weight``). Clean inputs do not carry the trigger, so
  the teacher passes on its clean behaviour, not the backdoor (Pang et al., "Backdoor Cleansing with
  Unlabeled Data", CVPR 2023); with FST's fresh classifier it gives back clean accuracy that 600
  hard labels alone cannot.
* ``distill_mixup = a > 0``: the KD term is measured on mixup views of the batch instead,
  ``lam x_i + (1 - lam) x_perm(i)`` with ``lam ~ Beta(a, a)`` per sample, the teacher and the tuned
  model on the same view ("function matching", Beyer et al., CVPR 2022). A mix of two clean inputs
  is still trigger-free, and it shows the teacher's clean function between the 600 samples, where hard
  labels say nothing. Continuous inputs only; one more forward pass per step.
* ``overlay_max = w > 0``: the tuned model sees *overlaid* views: half the batch, at random, gets
  another input of the batch laid over it, ``(1 - u) x_i + u x_perm(i)`` with ``u ~ U(0, w)``, and
  keeps its own label; the teacher of the KD term still sees the clean batch. So the tuned model is
  asked for the clean answer (the hard label and the teacher's clean outputs) under a faint overlay,
  the consistency of the teacher-clean / student-perturbed pair of Noisy Student (Xie et al., CVPR
  2020). A trigger blended into the whole image is such an overlay; a teacher shown overlaid views
  would pass its response to them on (see ``distill_mixup``), which is why it never sees them.
  Continuous inputs only; no extra forward pass. What "laid over" means belongs to the modality
  (``overlay_fn``, :data:`Overlay`): by default the blend above; a point cloud's points have no
  order, so the point-cloud modality inserts a cluster of the partner's points instead.
* Label smoothing (``label_smoothing > 0``) replaces the NLL by the likelihood's smoothed loss; the
  Fisher terms always use the true likelihood.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from smoothpurify.accel import full_precision
from smoothpurify.fisher import batch_statistics
from smoothpurify.likelihood import Likelihood
from smoothpurify.model import call_model

TraceFn = Callable[..., torch.Tensor]
# overlay(inputs, partners, weights, generator): ``inputs`` with ``partners`` (another input of the
# batch each) laid over them at ``weights`` ([N], 0 = left unchanged); returns a new tensor.
Overlay = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def blend_overlay(inputs: torch.Tensor, partners: torch.Tensor, weights: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The default overlay: ``(1 - w) x + w x'`` per sample."""
    w = weights.to(inputs.device, inputs.dtype).view(inputs.shape[0], *([1] * (inputs.dim() - 1)))
    return (1 - w) * inputs + w * partners


def anchor_penalty(params: dict[str, torch.Tensor], fisher_diag: dict[str, torch.Tensor],
                   anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``L_r``: Fisher-weighted squared distance of the tuned parameters from their start values."""
    names = [n for n in params if n in anchor]
    # Multi-tensor (foreach) ops, differentiable: three kernel launches for every tensor at once
    # instead of three per tensor (a GPU step of a small model is launch-bound); same numbers.
    diff = torch._foreach_sub([params[n] for n in names], [anchor[n] for n in names])
    terms = torch._foreach_mul(torch._foreach_mul(diff, diff), [fisher_diag[n] for n in names])
    return torch.stack([t.sum() for t in terms]).sum()


def anchor_penalty_and_grad(params: dict[str, torch.Tensor], fisher_diag: dict[str, torch.Tensor],
                            anchor: dict[str, torch.Tensor], weight: float
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_r`` and the gradient of ``weight / 2 * L_r``, ``weight * Fbar (theta - thetabar)``, without
    autograd (exact: ``L_r`` is quadratic). A handful of multi-tensor kernels for every tensor at once
    instead of ``L_r``'s graph and its backward: what a step replayed from a CUDA graph wants. ``Fbar``
    is a Fisher diagonal (>= 0), so each tensor's sum of ``Fbar d^2`` is its L1 norm."""
    names = [n for n in params if n in anchor]
    with torch.no_grad():
        diff = torch._foreach_sub([params[n] for n in names], [anchor[n] for n in names])
        weighted = torch._foreach_mul(diff, [fisher_diag[n] for n in names])
        penalty = torch.stack(torch._foreach_norm(torch._foreach_mul(weighted, diff), 1)).sum()
        grads = torch._foreach_mul(weighted, weight)
    return penalty, dict(zip(names, grads))


@dataclass
class Objective:
    likelihood: Likelihood
    trace_weight: float = 0.0
    trace_every: int = 10
    trace_step_bound: bool = False
    trace_fn: TraceFn | None = None
    anchor_weight: float = 0.0
    fisher_diag: dict[str, torch.Tensor] = field(default_factory=dict)
    anchor: dict[str, torch.Tensor] = field(default_factory=dict)
    label_smoothing: float = 0.0
    shift_weight: float = 0.0
    shift_reference: dict[str, torch.Tensor] = field(default_factory=dict)  # tuned name -> W_c^orig
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    teacher: nn.Module | None = None                 # the model as received, frozen, eval mode
    distill_mixup: float = 0.0                       # Beta(a, a) mixup views for the KD term; 0: the batch
    generator: torch.Generator | None = None         # draws the mixup weights and partners
    overlay_max: float = 0.0                         # > 0: the tuned model sees overlaid views (overlay_view)
    overlay_fn: Overlay | None = None                # the modality's overlay; None: blend_overlay
    trigger_views: Callable[[torch.Tensor], torch.Tensor] | None = None  # unlearn.TriggerViews: inverted triggers

    def mixup_view(self, inputs: torch.Tensor) -> torch.Tensor:
        """``lam x_i + (1 - lam) x_perm(i)``, ``lam ~ Beta(a, a)`` per sample, one random partner each."""
        n = inputs.shape[0]
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
        # torch's Beta takes no generator; numpy's, seeded from ours, keeps a run reproducible.
        lam = torch.from_numpy(np.random.default_rng(seed).beta(self.distill_mixup, self.distill_mixup, n))
        perm = torch.randperm(n, generator=self.generator).to(inputs.device)
        lam = lam.to(inputs.device, inputs.dtype).view(n, *([1] * (inputs.dim() - 1)))
        return lam * inputs + (1 - lam) * inputs[perm]

    def overlay_view(self, inputs: torch.Tensor) -> torch.Tensor:
        """Half the batch (at random) with another input of the batch laid over it at a weight
        ``w ~ U(0, overlay_max)`` (by default ``(1 - w) x_i + w x_perm(i)``); the rest unchanged."""
        n = inputs.shape[0]
        w = torch.rand(n, generator=self.generator) * self.overlay_max
        w = w * (torch.rand(n, generator=self.generator) < 0.5)
        perm = torch.randperm(n, generator=self.generator).to(inputs.device)
        return (self.overlay_fn or blend_overlay)(inputs, inputs[perm], w, self.generator)

    @staticmethod
    def _trace_scale(nll: torch.Tensor, term: torch.Tensor, params: dict[str, torch.Tensor]) -> float:
        """``min(1, ||grad NLL|| / ||grad eta_F Tr(F)||)``: the factor that keeps the trace term's
        gradient no longer than the NLL's on this batch (its direction is unchanged)."""
        tensors = list(params.values())
        g_nll = torch.autograd.grad(nll, tensors, retain_graph=True, allow_unused=True)
        g_term = torch.autograd.grad(term, tensors, retain_graph=True, allow_unused=True)
        norm = lambda gs: float(torch.sqrt(sum((g.detach() ** 2).sum() for g in gs if g is not None)))  # noqa: E731
        n_term = norm(g_term)
        return 1.0 if n_term == 0 else min(1.0, norm(g_nll) / n_term)

    def __call__(self, model: nn.Module, params: dict[str, torch.Tensor], inputs: Any,
                 targets: torch.Tensor, step: int, runner: nn.Module | None = None,
                 anchor_grads: dict[str, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Total loss for this step, and its parts for the record (detached tensors, so that reading
        them waits for the device only when the loop chooses; ``trace_scale`` is a float). With
        ``anchor_grads`` (a dict to fill), ``L_r`` enters the total as a value without graph and its
        gradient is written there instead (:func:`anchor_penalty_and_grad`).

        Under autocast the NLL and the other terms follow it; the Fisher trace runs in float32 (:func:`full_precision`)."""
        clean = inputs
        if self.overlay_max > 0:
            inputs = self.overlay_view(inputs)
        if self.trigger_views is not None:
            inputs = self.trigger_views(inputs)
        forward = runner if runner is not None else model   # a torch.compile wrapper of model, or model
        outputs = call_model(forward, inputs)
        nll = (self.likelihood.smoothed_nll(outputs, targets, self.label_smoothing) if self.label_smoothing
               else self.likelihood.nll(outputs, targets)).mean()
        total, parts = nll, {"nll": nll.detach()}
        if self.trace_weight > 0 and step % self.trace_every == 0:
            with batch_statistics(model, inputs), full_precision(targets.device.type):
                trace = self.trace_fn(model, inputs, targets, self.likelihood, params)
            weight = self.trace_weight
            if self.trace_step_bound:
                weight = weight * self._trace_scale(nll, weight * trace, params)
                parts["trace_scale"] = weight / self.trace_weight
            total = total + weight * trace
            parts["trace_f"] = trace.detach()
        if self.anchor_weight > 0:
            if anchor_grads is None:
                penalty = anchor_penalty(params, self.fisher_diag, self.anchor)
            else:
                penalty, grads = anchor_penalty_and_grad(params, self.fisher_diag, self.anchor, self.anchor_weight)
                anchor_grads.update(grads)
            total = total + 0.5 * self.anchor_weight * penalty
            parts["anchor"] = penalty.detach()
        if self.distill_weight > 0:
            view, student_out = clean, outputs
            if self.distill_mixup > 0:
                view = self.mixup_view(clean)   # the teacher never sees an overlaid input
                student_out = call_model(forward, view)
            with torch.no_grad():
                teacher_out = call_model(self.teacher, view)
            kd = self.likelihood.distill(student_out, teacher_out, targets, self.distill_temperature).mean()
            total = total + self.distill_weight * kd
            parts["distill"] = kd.detach()
        if self.shift_weight > 0:
            shift = torch.stack([(params[n] * ref).sum() for n, ref in self.shift_reference.items()]).sum()
            total = total + self.shift_weight * shift
            parts["shift"] = shift.detach()
        return total, parts
