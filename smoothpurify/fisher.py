"""Per-sample gradients, the Fisher diagonal and the Fisher trace (modality-agnostic).

Notation (SFT paper Eq. 4-6): ``l_j(theta) = log p(y_j | x_j; theta) = -nll_j``.

* ``diag(Fbar)_i = (1/n) sum_j (d l_j / d theta_i)^2`` over the whole clean validation set: a mean
  of SQUARED PER-SAMPLE gradients, never the square of a batch-mean gradient.
* ``Tr(F) = (1/B) sum_j ||grad_theta l_j||^2`` on a mini-batch, differentiable (second order).

Both are taken w.r.t. the *tuned* parameters only. Gradients are of ``l_j`` (not ``nll_j``); the
sign cancels in every square. Per-sample gradients need independent samples, so normalisation
layers with running statistics run in eval mode inside every function here (flags restored).
Dropout, if active, stays active, with an independent draw per sample.

Two implementations of the trace:

* :func:`fisher_trace` — ``torch.func.vmap(grad(...))``, any model, materialises one gradient per
  sample and parameter (6-16 plain training steps on ~400k-parameter CNNs, batch 128, 2 CPU
  cores; memory ``B x N``). The reference the fast path is tested against.
* ``spectral_trace.spectral_fisher_trace`` — for f-SFT (SFT paper §5.1): the per-sample gradient of a
  singular-value shift is ``relu'(s_i + delta_i) * sum_t (u_i^T dl/dz_t)(v_i^T a_t)`` (``z = W a``;
  ``t`` runs over tokens or conv positions). Every per-sample output gradient ``dl_j/dz`` comes from
  ONE backward of ``sum_j l_j`` (samples are independent), so no weight-sized per-sample tensor
  exists. This is the "ghost norm" idea of DP libraries; Opacus was evaluated and not used: its
  hooks detach activations and backprops (no gradient of the trace), compute norms of ``W`` rather
  than of the shifts, and do not see parameters that live inside parametrizations.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from smoothpurify import SmoothPurifyError
from smoothpurify.likelihood import Likelihood
from smoothpurify.model import call_model

FISHER_MODES = ("empirical", "true")


def tuned_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Named parameters that require grad; with :mod:`parametrize` these are e.g.
    ``conv.parametrizations.weight.0.delta`` (shared tensors are listed once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def independent_samples(model: nn.Module) -> Iterator[None]:
    """Normalisation layers with running statistics in eval mode, restored afterwards.

    In train mode batch norm mixes the samples of a batch, so "per-sample gradient" would not be
    defined (and vmap cannot update running statistics in place). LayerNorm/GroupNorm are
    per-sample already.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    for m in norms:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is None:
            raise SmoothPurifyError(f"{type(m).__name__} without running statistics normalises "
                                    "over the batch: per-sample Fisher terms are undefined")
    flags = [m.training for m in norms]
    try:
        for m in norms:
            m.training = False
        yield
    finally:
        for m, flag in zip(norms, flags):
            m.training = flag


@contextlib.contextmanager
def batch_statistics(model: nn.Module, inputs: Any) -> Iterator[None]:
    """Batch-norm layers that are training normalise with THIS batch's statistics, held fixed.

    The tuning loop trains in train mode, where batch norm normalises with batch statistics; the
    per-sample Fisher terms run in eval mode (:func:`independent_samples`), which would otherwise
    use the running statistics. Those lag behind the weights: a Tr(F) step that rescales a
    convolution leaves the train-mode network as it was but breaks the eval-mode one until the
    running statistics catch up, and the next Tr(F), measured on that broken network, is orders of
    magnitude larger (the SFT divergence, README). Inside this context the running statistics are
    this batch's (one forward without gradient), so Tr(F) is measured on the network the NLL
    trains, with samples still independent; the running statistics are restored on exit.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training and m.running_mean is not None]
    if not norms:
        yield
        return
    # Fresh tensors, not in-place copies: the Tr(F) graph keeps the statistics it normalised with.
    saved = [(m.running_mean, m.running_var, m.momentum, m.num_batches_tracked) for m in norms]
    try:
        for m in norms:
            m.running_mean, m.running_var = m.running_mean.clone(), m.running_var.clone()
            if m.num_batches_tracked is not None:
                m.num_batches_tracked = m.num_batches_tracked.clone()
            m.momentum = 1.0  # running statistics := this batch's
        with torch.no_grad():
            call_model(model, inputs)
        yield
    finally:
        for m, (mean, var, momentum, tracked) in zip(norms, saved):
            m.running_mean, m.running_var, m.momentum, m.num_batches_tracked = mean, var, momentum, tracked


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _batch_size(targets: torch.Tensor) -> int:
    if targets.dim() == 0 or targets.shape[0] == 0:
        raise SmoothPurifyError("empty batch: the Fisher needs at least one sample")
    return targets.shape[0]


def per_sample_grads(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Likelihood,
                     params: dict[str, torch.Tensor] | None = None, create_graph: bool = False,
                     chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """``{name: d l_j / d theta}`` of shape ``[B, *param.shape]`` for the tuned parameters.

    ``inputs`` follows :func:`call_model` (tensor or tuple, every element batched on dim 0). With
    ``create_graph`` the result is differentiable w.r.t. ``params`` (for Tr(F)); otherwise it is
    computed without any outer graph. ``chunk_size`` bounds vmap's memory on large models.
    """
    params = dict(params) if params is not None else tuned_parameters(model)
    _batch_size(targets)
    xs = _as_tuple(inputs)

    def loglik(p: dict[str, torch.Tensor], x: tuple[torch.Tensor, ...], y: torch.Tensor):
        out = functional_call(model, p, tuple(t.unsqueeze(0) for t in x))
        return -likelihood.nll(out, y.unsqueeze(0)).sum()

    if not create_graph:
        params = {n: p.detach() for n, p in params.items()}
    per_sample = vmap(grad(loglik), in_dims=(None, 0, 0), randomness="different",
                      chunk_size=chunk_size)
    # An outer no_grad is respected by the transforms only outside them: grad still works.
    with independent_samples(model), torch.set_grad_enabled(create_graph):
        return per_sample(params, xs, targets)


@torch.no_grad()
def sample_targets(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Likelihood,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Targets drawn from the model (the "true" Fisher), keeping ignored positions (padding)."""
    with independent_samples(model):
        sampled = likelihood.sample(call_model(model, inputs), generator)
    ignore = getattr(likelihood, "ignore_index", None)
    if ignore is not None:
        sampled = torch.where(targets == ignore, targets, sampled)
    return sampled.to(targets.dtype)


def fisher_diagonal(model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]],
                    likelihood: Likelihood, mode: str = "empirical",
                    generator: torch.Generator | None = None,
                    params: dict[str, torch.Tensor] | None = None,
                    chunk_size: int | None = None, fast: bool = True) -> dict[str, torch.Tensor]:
    """``diag(Fbar)`` at the current parameters: mean over ALL samples of all batches of squared
    per-sample gradients. ``mode="true"`` samples targets from the model (needs a seeded
    ``generator`` to be reproducible); ``"empirical"`` (the papers' choice) uses the given ones.
    With ``fast`` the spectral shifts' per-sample gradients come from the ghost-norm path (as in
    ``spectral_trace.spectral_fisher_trace``); everything else, or everything with ``fast=False``, from vmap."""
    from smoothpurify.spectral_trace import _fast_per_sample_grads  # builds on this module

    if mode not in FISHER_MODES:
        raise SmoothPurifyError(f"unknown Fisher mode {mode!r}; choose one of {', '.join(FISHER_MODES)}")
    params = dict(params) if params is not None else tuned_parameters(model)
    sums = {n: torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
            for n, p in params.items()}
    n_samples = 0
    for inputs, targets in batches:
        if mode == "true":
            targets = sample_targets(model, inputs, targets, likelihood, generator)
        grads, rest = (_fast_per_sample_grads(model, inputs, targets, likelihood, params, False)
                       if fast else ({}, params))
        if rest:
            grads.update(per_sample_grads(model, inputs, targets, likelihood, rest,
                                          chunk_size=chunk_size))
        for name, g in grads.items():
            sums[name] += g.pow(2).sum(0)
        n_samples += targets.shape[0]
    if n_samples == 0:
        raise SmoothPurifyError("empty validation set: cannot compute the Fisher diagonal")
    return {n: s / n_samples for n, s in sums.items()}


def fisher_trace(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Likelihood,
                 params: dict[str, torch.Tensor] | None = None,
                 chunk_size: int | None = None) -> torch.Tensor:
    """``Tr(F) = (1/B) sum_j ||grad l_j||^2`` over ``params`` (default: tuned), differentiable."""
    params = dict(params) if params is not None else tuned_parameters(model)
    batch = _batch_size(targets)
    if not params:
        return torch.zeros((), device=targets.device)
    grads = per_sample_grads(model, inputs, targets, likelihood, params, create_graph=True,
                             chunk_size=chunk_size)
    return sum(g.reshape(batch, -1).pow(2).sum() for g in grads.values()) / batch
