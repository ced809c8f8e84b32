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
from typing import Any, Iterable

import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.accel import FiniteGuard, full_precision
from smoothpurify.cuda_graphs import CapturedStep, GraphedRunner
from smoothpurify.fisher import per_sample_grads
from smoothpurify.methods import MethodConfig
from smoothpurify.objective import Objective, anchor_penalty
from smoothpurify.optim import NaturalGradient
from smoothpurify.spectral_trace import spectral_fisher_trace, spectral_trace_step

# f-SFT's trace steps through spectral_trace.spectral_trace_step (one forward instead of three passes,
# BatchClosure._fused_trace_step); False: every step through Objective (the reference path).
FUSED_SPECTRAL_TRACE = True


def fuses_trace(cfg: MethodConfig, objective: Objective) -> bool:
    """f-SFT's objective is NLL + eta_F Tr(F) + eta_r / 2 L_r; the fused step computes exactly
    that (other terms, a smoothed NLL or an optimizer that is more than "step along .grad" go
    through the Objective)."""
    return (FUSED_SPECTRAL_TRACE and cfg.parametrization == "spectral" and cfg.fast_trace
            and objective.trace_fn is spectral_fisher_trace and objective.trace_weight > 0
            and cfg.optimizer in ("sgd", "adam") and not cfg.label_smoothing and not cfg.distill_weight
            and not cfg.feature_shift_weight and not cfg.overlay_max)


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
        penalty = anchor_penalty(params, obj.fisher_diag, obj.anchor)
        scaled = 0.5 * obj.anchor_weight * penalty
        for n, g in zip(params, torch.autograd.grad(scaled, list(params.values()), allow_unused=True)):
            if g is not None:
                grads[n] = grads[n] + g
        total = total + scaled.detach()
        parts["anchor"] = penalty.detach()
    return total, parts, grads


class BatchClosure:
    """The loss of this step's batch for ``optimizer.step(closure)``: clears the gradients, evaluates
    the objective, checks it is finite, backpropagates (and clips). ``curvature(opt)`` hands a
    natural-gradient optimizer the batch's Fisher (exact, or K-FAC factors on a linear classifier).
    With ``fused`` (a one-element list, set to False once the model turns out not to allow it),
    f-SFT's trace steps go through :meth:`_fused_trace_step`. ``runner`` is what computes the
    NLL's forward (``model`` itself, its ``torch.compile`` wrapper or a
    :class:`~smoothpurify.cuda_graphs.GraphedRunner`); ``guard`` checks the loss is finite (at once, or
    deferred to the epoch's end on a GPU); ``trace_graph`` (a one-element list) holds the CUDA graph of
    f-SFT's fused trace step, None once capture failed."""

    def __init__(self, opt, objective: Objective, model: nn.Module, params: dict[str, torch.Tensor], x: Any,
                 y: torch.Tensor, step: int, cfg: MethodConfig, where: str, guard: FiniteGuard,
                 fused: list[bool] | None = None, runner: nn.Module | None = None,
                 trace_graph: list[CapturedStep | None] | None = None):
        self.opt, self.objective, self.model, self.params = opt, objective, model, params
        self.x, self.y, self.step, self.cfg, self.where = x, y, step, cfg, where
        self.guard, self.fused, self.runner, self.trace_graph = guard, fused, runner, trace_graph
        self.parts: dict[str, torch.Tensor | float] = {}

    def _check(self, loss: torch.Tensor) -> None:
        self.guard.check(loss, self.where)

    def __call__(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        obj = self.objective
        if self.fused and self.fused[0] and self.step % obj.trace_every == 0:
            loss = self._fused_trace_step()
            if loss is not None:
                return loss
            self.fused[0] = False
        runner = self.runner
        if isinstance(runner, GraphedRunner) and obj.trace_weight > 0 and self.step % obj.trace_every == 0:
            runner = None  # the trace differentiates the NLL more than once: not through replayed graphs
        loss, self.parts = obj(self.model, self.params, self.x, self.y, self.step, runner=runner)
        self._check(loss)
        loss.backward()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm)
        return loss

    def _fused_trace_step(self) -> torch.Tensor | None:
        """What ``Objective.__call__`` and ``backward()`` compute on a trace step (same parts, same
        step bound, same gradient), from :func:`fused_trace` (one ghost-norm pass instead of five
        forward/backward passes), replayed from a CUDA graph when the loop has one
        (``trace_graph``); ``None`` if the model does not allow it."""
        graph = self.trace_graph[0] if self.trace_graph else None
        if graph is not None:
            try:
                out = graph(self.x, self.y)
            except RuntimeError as err:  # this model's step cannot be captured: eager from now on
                warnings.warn(f"{self.cfg.name}: the trace step runs eagerly (CUDA graph capture failed: {err})",
                              RuntimeWarning, stacklevel=2)
                self.trace_graph[0] = None
                out = fused_trace(self.objective, self.model, self.params, self.x, self.y)
            else:  # the graph's outputs are overwritten by its next replay
                out = None if out is None else (out[0].clone(), {k: v.clone() for k, v in out[1].items()}, out[2])
        else:
            out = fused_trace(self.objective, self.model, self.params, self.x, self.y)
        if out is None:
            return None
        total, parts, grads = out
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
