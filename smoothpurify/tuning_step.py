"""One step of the tuning loop: the closure ``optimizer.step(closure)`` evaluates, and f-SFT's fused
trace step.

:class:`BatchClosure` clears the gradients, evaluates the objective on this step's batch, checks the
loss is finite (at once, or deferred to the epoch's end on a GPU: :class:`~smoothpurify.accel.FiniteGuard`)
and backpropagates; on f-SFT's trace steps it can take the NLL, the trace and both gradients from one
ghost-norm pass (:func:`~smoothpurify.spectral_trace.spectral_trace_step`). ``curvature(opt)`` hands a
natural-gradient optimizer the batch's Fisher.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.accel import FiniteGuard, full_precision
from smoothpurify.cuda_graphs import CapturedStep, GraphedRunner
from smoothpurify.fisher import per_sample_grads
from smoothpurify.methods import MethodConfig
from smoothpurify.objective import Objective, anchor_penalty, anchor_penalty_and_grad
from smoothpurify.optim import NaturalGradient
from smoothpurify.spectral_trace import spectral_fisher_trace, spectral_trace_step

# f-SFT's trace steps through spectral_trace.spectral_trace_step (one forward instead of three passes,
# fused_trace); False: every step through Objective (the reference path).
FUSED_SPECTRAL_TRACE = True


def fuses_trace(cfg: MethodConfig, objective: Objective) -> bool:
    """f-SFT's objective is NLL + eta_F Tr(F) + eta_r / 2 L_r; the fused step computes exactly
    that (other terms, a smoothed NLL or an optimizer that is more than "step along .grad" go
    through the Objective)."""
    return (FUSED_SPECTRAL_TRACE and cfg.parametrization == "spectral" and cfg.fast_trace
            and objective.trace_fn is spectral_fisher_trace and objective.trace_weight > 0
            and cfg.optimizer in ("sgd", "adam") and not cfg.label_smoothing and not cfg.distill_weight
            and not cfg.feature_shift_weight and not cfg.overlay_max and not cfg.unlearn_share)


def floats(parts: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in parts.items()}


def mean_of(values: list[torch.Tensor | float]) -> float:
    """Mean of one term's per-step values: floats summed in order (the reference path's numbers),
    device tensors summed in float64 on the device and read once."""
    numbers = [v for v in values if not isinstance(v, torch.Tensor)]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    total = sum(numbers, 0.0) + (float(torch.stack(tensors).double().sum()) if tensors else 0.0)
    return total / len(values)


def _norm(grads: Iterable[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads)))


def _device_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g.detach() for g in grads])))


def fused_trace(obj: Objective, model: nn.Module, params: dict[str, torch.Tensor], x: Any, y: torch.Tensor,
                on_device: bool = False) -> tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor]] | None:
    """f-SFT's trace step: ``(total loss, parts, gradient per parameter)`` of NLL + eta_F Tr(F) +
    eta_r / 2 L_r with the NLL, the trace and both gradients from one ghost-norm pass
    (:func:`spectral_trace_step`); ``None`` if the model does not allow it. The step bound
    (``Objective._trace_scale`` on the gradients at hand) is read on the host, or, ``on_device``,
    kept on the device as a tensor (nothing waits for the device: what a captured CUDA graph needs)."""
    with full_precision(y.device.type):
        out = spectral_trace_step(model, x, y, obj.likelihood, params)
    if out is None:
        return None
    nll, trace, g_nll, g_trace = out
    weight: Any = obj.trace_weight
    parts: dict[str, Any] = {"nll": nll.detach()}
    if obj.trace_step_bound:
        if on_device:
            n_term = weight * _device_norm(g_trace.values())
            ratio = (_device_norm(g_nll.values()) / n_term).clamp(max=1.0)
            weight = weight * torch.where(n_term == 0, torch.ones_like(ratio), ratio)
        else:
            n_term = _norm(weight * g for g in g_trace.values())
            weight = weight * (1.0 if n_term == 0 else min(1.0, _norm(g_nll.values()) / n_term))
        parts["trace_scale"] = weight / obj.trace_weight
    total = nll.detach() + weight * trace.detach()
    parts["trace_f"] = trace.detach()
    grads = {n: g_nll[n] + weight * g_trace[n] for n in params}
    if obj.anchor_weight > 0:
        if on_device:
            penalty, anchor_grads = anchor_penalty_and_grad(params, obj.fisher_diag, obj.anchor, obj.anchor_weight)
        else:
            penalty = anchor_penalty(params, obj.fisher_diag, obj.anchor)
            found = torch.autograd.grad(0.5 * obj.anchor_weight * penalty, list(params.values()), allow_unused=True)
            anchor_grads = {n: g for n, g in zip(params, found) if g is not None}
        grads = add_grads(grads, anchor_grads)
        total = total + (0.5 * obj.anchor_weight * penalty).detach()
        parts["anchor"] = penalty.detach()
    return total, parts, grads


def add_grads(grads: dict[str, torch.Tensor | None], extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """``grads`` plus ``extra`` per name (one multi-tensor add; an absent or None gradient takes ``extra``'s)."""
    both = [n for n in extra if grads.get(n) is not None]
    out = dict(grads)
    out.update(zip(both, torch._foreach_add([grads[n] for n in both], [extra[n] for n in both])))
    out.update({n: g for n, g in extra.items() if n not in both})
    return out


def plain_step(obj: Objective, model: nn.Module, params: dict[str, torch.Tensor], x: Any, y: torch.Tensor,
               on_device: bool = False) -> tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor | None]]:
    """``(loss, parts, gradient per parameter)`` of a step without the trace term, the gradients from
    :func:`torch.autograd.grad` (None where a parameter is unused, as ``backward()`` leaves it): what a
    step captured whole in a CUDA graph computes; ``on_device``, the anchor's gradient in closed form
    (:func:`~smoothpurify.objective.anchor_penalty_and_grad`: fewer kernels). Only for objectives whose
    trace term is off or not due at every step (``step=1`` must be a step without it)."""
    anchor_grads: dict[str, torch.Tensor] | None = {} if on_device else None
    loss, parts = obj(model, params, x, y, 1, anchor_grads=anchor_grads)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    return loss.detach(), parts, add_grads(grads, anchor_grads) if anchor_grads else grads


class BatchClosure:
    """The loss of this step's batch for ``optimizer.step(closure)``: clears the gradients, evaluates
    the objective, checks it is finite, backpropagates (and clips). ``curvature(opt)`` hands a
    natural-gradient optimizer the batch's Fisher (exact, or K-FAC factors on a linear classifier).
    With ``fused`` (a one-element list, set to False once the model turns out not to allow it),
    f-SFT's trace steps go through :func:`fused_trace`. ``runner`` is what computes the
    NLL's forward (``model`` itself, its ``torch.compile`` wrapper or a
    :class:`~smoothpurify.cuda_graphs.GraphedRunner`); ``guard`` checks the loss is finite (at once, or
    deferred to the epoch's end on a GPU); ``graphs`` holds the loop's CUDA graphs (``"plain"``: a step
    without the trace term captured whole, ``"trace"``: f-SFT's fused trace step), shared by every
    step's closure; an entry is set to None once its capture failed."""

    def __init__(self, opt, objective: Objective, model: nn.Module, params: dict[str, torch.Tensor], x: Any,
                 y: torch.Tensor, step: int, cfg: MethodConfig, where: str, guard: FiniteGuard,
                 fused: list[bool] | None = None, runner: nn.Module | None = None,
                 graphs: dict[str, CapturedStep | None] | None = None):
        self.opt, self.objective, self.model, self.params = opt, objective, model, params
        self.x, self.y, self.step, self.cfg, self.where = x, y, step, cfg, where
        self.guard, self.fused, self.runner, self.graphs = guard, fused, runner, graphs
        self.parts: dict[str, torch.Tensor | float] = {}

    def _check(self, loss: torch.Tensor) -> None:
        self.guard.check(loss, self.where)

    def __call__(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        obj = self.objective
        trace_step = obj.trace_weight > 0 and self.step % obj.trace_every == 0
        if self.fused and self.fused[0] and trace_step:
            out = self._replayed("trace", lambda: fused_trace(obj, self.model, self.params, self.x, self.y))
            if out is not None:
                return self._apply(*out)
            self.fused[0] = False
        if not trace_step and self.graphs and self.graphs.get("plain") is not None:
            out = self._replayed("plain", lambda: None)
            if out is not None:
                return self._apply(*out)
        runner = self.runner
        if isinstance(runner, GraphedRunner) and trace_step:
            runner = None  # the trace differentiates the NLL more than once: not through replayed graphs
        loss, self.parts = obj(self.model, self.params, self.x, self.y, self.step, runner=runner)
        self._check(loss)
        loss.backward()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm)
        return loss

    def _replayed(self, kind: str, eager: Callable[[], tuple | None]) -> tuple | None:
        """``(loss, parts, grads)`` from the loop's CUDA graph ``kind``, cloned where the next replay
        would overwrite them; ``eager()`` where there is no such graph or its capture fails."""
        graph = self.graphs.get(kind) if self.graphs else None
        if graph is None:
            return eager()
        try:
            out = graph(self.x, self.y)
        except RuntimeError as err:  # this model's step cannot be captured: eager from now on
            warnings.warn(f"{self.cfg.name}: the {kind} step runs eagerly (CUDA graph capture failed: {err})",
                          RuntimeWarning, stacklevel=3)
            self.graphs[kind] = None
            return eager()
        if out is None:
            return None
        total, parts, grads = out
        return total.clone(), {k: v.clone() for k, v in parts.items()}, grads

    def _apply(self, total: torch.Tensor, parts: dict[str, Any], grads: dict[str, torch.Tensor | None]
               ) -> torch.Tensor:
        """Hand a computed step to the optimizer: check the loss, set the gradients, clip."""
        self._check(total)
        for n, p in self.params.items():
            p.grad = grads[n]
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm)
        self.parts = parts
        return total

    def curvature(self, opt: NaturalGradient) -> None:
        with full_precision(self.y.device.type):
            self._curvature(opt)

    def _curvature(self, opt: NaturalGradient) -> None:
        likelihood, x, y = self.objective.likelihood, self.x, self.y
        if opt.solvers[0] == "exact":
            grads = per_sample_grads(self.model, x, y, likelihood, self.params)
            opt.update_fisher([grads[n] for n in self.params])
            return
        if not isinstance(self.model, nn.Linear):
            raise SmoothPurifyError("K-FAC natural gradient needs a linear classifier on cached features")
        z = self.model(x).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(likelihood.nll(z, y).sum(), z)  # per-sample dl_j/dz_j
        opt.update_kfac(x.reshape(len(y), -1), g, has_bias=self.model.bias is not None)
