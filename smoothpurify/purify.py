"""The one tuning loop every purification method uses (parametrization x objective x optimizer).

``purify(model, inputs, targets, likelihood, config)`` fine-tunes a copy of ``model`` on the clean
validation set and returns the purified plain model (original architecture) with a record:
settings, wall seconds split into setup (SVD, Fisher diagonal, feature cache) and tuning,
per-epoch validation loss, and metrics when an ``evaluate`` callback is given. Nothing here looks at
poisoned data: ``evaluate`` is for reporting only and never steers the run.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from smoothpurify import SmoothPurifyError
from smoothpurify.fisher import fisher_diagonal, fisher_trace, per_sample_grads, spectral_fisher_trace
from smoothpurify.likelihood import Likelihood
from smoothpurify.methods import MethodConfig
from smoothpurify.model import call_model, penultimate_features
from smoothpurify.objective import Objective
from smoothpurify.optim import NaturalGradient, make_optimizer
from smoothpurify.parametrize import prepare
from smoothpurify.training import index_inputs, num_samples, to_device

Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass
class PurifyResult:
    model: nn.Module
    record: dict[str, Any] = field(default_factory=dict)


def _batches(inputs: Any, targets: torch.Tensor, batch_size: int, order: torch.Tensor | None = None):
    order = torch.arange(len(targets)) if order is None else order
    for idx in order.split(batch_size):
        yield index_inputs(inputs, idx), targets[idx]


@torch.no_grad()
def _mean_nll(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Likelihood, bs: int) -> float:
    total = sum(float(likelihood.nll(call_model(model, x), y).sum()) for x, y in _batches(inputs, targets, bs))
    return total / len(targets)


def diverged(start: float, end: float) -> bool:
    """Did tuning blow up the clean validation loss? More than doubled, and by more than 0.5 nats.

    Uses only the defender's clean data. A diverged run can show ASR 0 with a destroyed model, so it
    must not count as a purification (the report marks it and never calls it best).
    """
    return not math.isfinite(end) or (end > 2 * start and end - start > 0.5)


def _check_data(targets: torch.Tensor) -> None:
    if len(targets) == 0:
        raise SmoothPurifyError("the clean validation set is empty")
    if targets.dim() == 1 and targets.dtype in (torch.int64, torch.int32) and targets.unique().numel() < 2:
        raise SmoothPurifyError("the clean validation set has a single class; purification needs several")


def _make_optimizer(cfg: MethodConfig, params: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
    values = list(params.values())
    if cfg.optimizer == "sgd":
        return make_optimizer("sgd", values, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return make_optimizer("adam", values, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sam":
        return make_optimizer("sam", values, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              rho=cfg.sam_rho)
    return make_optimizer("natural_gradient", values, lr=cfg.lr, damping=cfg.damping, momentum=cfg.momentum)


def _update_curvature(opt: NaturalGradient, model: nn.Module, params: dict[str, torch.Tensor], x: Any,
                      y: torch.Tensor, likelihood: Likelihood) -> None:
    """Give the natural-gradient optimizer the Fisher of this batch (exact, or K-FAC factors)."""
    if opt.solvers[0] == "exact":
        grads = per_sample_grads(model, x, y, likelihood, params)
        opt.update_fisher([grads[n] for n in params])
        return
    if not isinstance(model, nn.Linear):
        raise SmoothPurifyError("K-FAC natural gradient needs a linear classifier on cached features")
    z = model(x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(likelihood.nll(z, y).sum(), z)  # per-sample dl_j/dz_j
    opt.update_kfac(x.reshape(len(y), -1), g, has_bias=model.bias is not None)


def purify(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Likelihood, config: MethodConfig,
           *, classifier: str | None = None, seed: int = 0, device: str = "cpu", evaluate: Evaluate | None = None,
           eval_every: int | None = None, progress: bool = True) -> PurifyResult:
    """Purify a copy of ``model`` with ``config``; ``inputs, targets`` is the clean validation set."""
    cfg = config
    _check_data(targets)
    batch_size = cfg.batch_size or len(targets)
    t0 = time.perf_counter()
    tuned = prepare(model.to(device), cfg.parametrization, classifier=classifier, tune_bias=cfg.tune_bias,
                    tune_norm=cfg.tune_norm)
    inputs, targets = to_device(inputs, device), targets.to(device)
    work, work_inputs = tuned.model, inputs
    if cfg.parametrization == "last_layer" and cfg.cache_features:
        # The backbone is frozen and in eval mode: its features never change, compute them once.
        tuned.eval()
        work = tuned.model.get_submodule(tuned.classifier)
        work_inputs = torch.cat([penultimate_features(tuned.model, x, tuned.classifier)
                                 for x, _ in _batches(inputs, targets, 512)])
    params = {n: p for n, p in work.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(seed)
    objective = Objective(likelihood, trace_weight=cfg.trace_weight, trace_every=cfg.trace_every,
                          trace_fn=spectral_fisher_trace if cfg.parametrization == "spectral" and cfg.fast_trace
                          else fisher_trace, anchor_weight=cfg.anchor_weight)
    if cfg.anchor_weight > 0:
        tuned.eval()
        objective.fisher_diag = fisher_diagonal(work, _batches(work_inputs, targets, 128), likelihood,
                                                mode=cfg.fisher, generator=gen, params=params)
        objective.anchor = {n: p.detach().clone() for n, p in params.items()}
    tuned.eval()
    val_loss_start = _mean_nll(work, work_inputs, targets, likelihood, 512)
    setup_seconds = time.perf_counter() - t0

    opt = _make_optimizer(cfg, params)
    base_opt = getattr(opt, "base_optimizer", opt)
    sched = (torch.optim.lr_scheduler.StepLR(base_opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
             if cfg.lr_step else None)
    n, step, eval_seconds = num_samples(work_inputs), 0, 0.0
    val_loss, curves, parts = [], [], {}
    steps_total = cfg.epochs * math.ceil(n / batch_size)
    bar = tqdm(total=steps_total, desc=f"purify {cfg.name}", disable=None if progress else True, leave=False)
    t1 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        tuned.train()
        for x, y in _batches(work_inputs, targets, batch_size, torch.randperm(n, generator=gen)):
            if isinstance(opt, NaturalGradient):
                _update_curvature(opt, work, params, x, y, likelihood)

            def closure():
                nonlocal parts
                opt.zero_grad(set_to_none=True)
                loss, parts = objective(work, params, x, y, step)
                if not torch.isfinite(loss):
                    raise SmoothPurifyError(f"{cfg.name}: loss became {loss.item()} at epoch {epoch}, step {step}; "
                                            f"lower the learning rate (now {cfg.lr})")
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                return loss

            if cfg.optimizer == "sam":
                closure()  # the ascent direction needs this step's gradient at w, not a stale one
                opt.step(closure)
            else:
                closure()
                opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, **{k: f"{v:.3g}" for k, v in parts.items()})
        if sched is not None:
            sched.step()
        tuned.eval()
        val_loss.append(_mean_nll(work, work_inputs, targets, likelihood, 512))
        if evaluate is not None and eval_every and (epoch % eval_every == 0 or epoch == cfg.epochs):
            te = time.perf_counter()
            curves.append({"epoch": epoch, "val_loss": val_loss[-1], **evaluate(tuned.model)})
            eval_seconds += time.perf_counter() - te
    bar.close()
    tuning_seconds = time.perf_counter() - t1 - eval_seconds
    tuned.eval()
    merged = tuned.merge().eval()
    record: dict[str, Any] = {
        "method": cfg.name, "config": cfg.model_dump(), "seed": seed, "steps": step,
        "tuned_parameters": int(sum(p.numel() for p in params.values())),
        "seconds": {"setup": round(setup_seconds, 3), "tuning": round(tuning_seconds, 3),
                    "total": round(setup_seconds + tuning_seconds, 3)},
        "val_loss_start": val_loss_start, "val_loss": val_loss, "last_step": parts,
        "diverged": diverged(val_loss_start, val_loss[-1]),
    }
    if record["diverged"]:
        warnings.warn(f"{cfg.name}: the clean validation loss rose from {val_loss_start:.3g} to {val_loss[-1]:.3g}; "
                      f"the tuning diverged (lower lr, now {cfg.lr}, or trace_weight, now {cfg.trace_weight})",
                      RuntimeWarning, stacklevel=2)
    if curves:
        record["curves"] = curves
    if evaluate is not None:
        record["metrics"] = evaluate(merged)
    return PurifyResult(merged, record)
