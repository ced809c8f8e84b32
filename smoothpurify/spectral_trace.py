"""The fast Fisher trace for spectral shifts (f-SFT, SFT paper §5.1): ghost norms, no per-sample weights.

The per-sample gradient of a singular-value shift is ``relu'(s_i + delta_i) * sum_t (u_i^T dl/dz_t)
(v_i^T a_t)`` (``z = W a``; ``t`` runs over tokens or conv positions). Every per-sample output
gradient ``dl_j/dz`` comes from ONE backward of ``sum_j l_j`` (samples are independent), so no
weight-sized per-sample tensor exists. :func:`spectral_fisher_trace` equals
:func:`smoothpurify.fisher.fisher_trace` on spectral parameters (tested, and checked at run time by
:func:`verify_spectral_trace`); :func:`spectral_trace_step` gives f-SFT's NLL, trace and both
gradients from one pass.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize as P

from smoothpurify.fisher import _batch_size, fisher_trace, independent_samples, tuned_parameters
from smoothpurify.likelihood import Likelihood
from smoothpurify.model import call_model
from smoothpurify.parametrize import SpectralShift, runs_factored

_FAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _linear_projection(shift: SpectralShift, a: torch.Tensor, g: torch.Tensor,
                       a_v: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, r]``: ``sum_t (u_i^T g_t)(v_i^T a_t)`` with ``t`` over any middle (token) dims;
    ``a_v = Vh a`` if the layer's (factored) forward computed it already."""
    b, rank = g.shape[0], shift.s.numel()
    a_v = (a.reshape(b, -1, a.shape[-1]) @ shift.Vh.transpose(0, 1) if a_v is None
           else a_v.reshape(b, -1, rank))
    g_u = g.reshape(b, -1, g.shape[-1]) @ shift.U
    return (a_v * g_u).sum(1)


def _conv_projection(conv: nn.Module, shift: SpectralShift, a: torch.Tensor,
                     g: torch.Tensor, a_v: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, r]`` for a conv: ``v_i^T patch_p`` is a convolution of the input with the rows of
    ``Vh`` as filters (same stride/padding/dilation, any dimension, any padding mode), so no
    unfold is needed; with groups, output channels of group ``k`` see only input group ``k``.
    Costs about one forward of the layer, nothing if a factored forward passes it as ``a_v``."""
    b, out = g.shape[:2]
    groups, rank = conv.groups, shift.s.numel()
    if a_v is None:
        filters = shift.Vh.reshape(rank, *shift.shape[1:])
        if groups > 1:
            filters = filters.repeat(groups, *([1] * (filters.dim() - 1)))
        a_v = conv._conv_forward(a, filters, None)
    a_v = a_v.reshape(b, groups, rank, -1)
    # A broadcast matmul, not einsum: ~2x faster forward+backward on CPU (no permuted copies).
    u_t = shift.U.reshape(groups, out // groups, rank).transpose(1, 2)
    g_u = u_t @ g.reshape(b, groups, out // groups, -1)
    return (a_v * g_u).sum((1, 3))


def _affine_norm(norm: nn.Module, args: tuple, _output: torch.Tensor) -> torch.Tensor:
    """Forward hook: batch norm in eval mode rewritten as the per-channel affine map it is.

    Same numbers, but its double backward is two multiplications instead of the generic
    batch-norm double backward, which took ~17% of the trace's backward on a small CNN."""
    x = args[0]
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.weight is not None:
        scale, shift = scale * norm.weight, shift * norm.weight
    if norm.bias is not None:
        shift = shift + norm.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


def _fast_owners(model: nn.Module, names: dict[int, str]) -> dict[int, tuple[SpectralShift, list]]:
    """SpectralShifts whose delta is in the trace, with the Linear/Conv modules that own them."""
    owners: dict[int, tuple[SpectralShift, list]] = {}
    for module in model.modules():
        if isinstance(module, _FAST_LAYERS) and P.is_parametrized(module, "weight"):
            shift = module.parametrizations.weight[-1]
            if isinstance(shift, SpectralShift) and id(shift.delta) in names:
                owners.setdefault(id(shift), (shift, []))[1].append(module)
    return owners


def _fast_per_sample_grads(model: nn.Module, inputs: Any, targets: torch.Tensor,
                           likelihood: Likelihood, params: dict[str, torch.Tensor],
                           create_graph: bool, loglik_out: list | None = None
                           ) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-sample gradients ``[B, *shape]`` of the spectral shifts of Linear/Conv layers (and of
    those layers' tuned biases: the output gradient summed over positions), from one forward
    and one backward; returns them with the parameters it could not cover. ``loglik_out``, if
    given, receives the per-sample log-likelihoods of that forward (with their graph).

    A shift is covered only if its weight was read exactly once per call of its owning layers,
    with the batch on dim 0 of the layer's input and output. Anything else (attention
    in-projections, a weight read with ``F.linear`` outside its module, norm parameters) is left
    for the vmap path. Calls of a layer used several times are summed, as autograd would.
    A layer that runs factored (parametrize.py) hands over ``Vh a`` from its forward, so its
    projection needs no extra convolution of ``a`` with ``Vh``.
    """
    batch = _batch_size(targets)
    names = {id(p): n for n, p in params.items()}
    owners = _fast_owners(model, names)
    if not owners:
        return {}, params
    calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    reads: dict[int, int] = {key: 0 for key in owners}
    factored: dict[int, list] = {}

    def record(module, args, output):
        calls.setdefault(module, []).append((args[0], output))
        # Downstream in-place ops (ReLU(inplace=True)) must not rewrite the tensor we
        # differentiate w.r.t.: the network continues on a copy (measured: ~1% of the cost).
        return output.clone()

    def count(shift, _args, _output):
        reads[id(shift)] += 1

    with independent_samples(model), torch.enable_grad():
        handles = []
        try:
            for key, (shift, modules) in owners.items():
                shift.record = factored[key] = []
                handles.append(shift.register_forward_hook(count))
                handles += [m.register_forward_hook(record) for m in modules]
            handles += [m.register_forward_hook(_affine_norm) for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._NormBase)
                        and m.running_var is not None and not m.training]
            loglik = -likelihood.nll(call_model(model, inputs), targets)
        finally:
            for h in handles:
                h.remove()
            for shift, _ in owners.values():
                shift.record = None
    if loglik_out is not None:
        loglik_out.append(loglik)

    # jobs: (shift, layer, a, z, a_v); a_v = Vh a from a factored forward, None if it read W.
    jobs: list[tuple] = []
    for key, (shift, modules) in owners.items():
        seen = [c for m in modules for c in calls.get(m, [])]
        # A batched conv input has as many dims as the weight; an unbatched one (C, L) has fewer.
        min_dim = 2 if isinstance(modules[0], nn.Linear) else len(shift.shape)
        if not (reads[key] + len(factored[key]) == len(seen) and seen and all(
                a.dim() >= min_dim and a.shape[0] == batch and z.shape[0] == batch for a, z in seen)):
            continue
        mine = []
        for module in modules:
            layer_calls = calls.get(module, [])
            if runs_factored(module):
                a_vs = [a_v for layer, a_v in factored[key] if layer is module]
                if len(a_vs) != len(layer_calls):
                    break
            else:
                a_vs = [None] * len(layer_calls)
            mine += [(shift, module, a, z, a_v) for (a, z), a_v in zip(layer_calls, a_vs)]
        else:
            jobs += mine
    if not jobs:
        return {}, params
    # Samples are independent, so d(sum_j l_j)/dz_j = dl_j/dz_j for every sample at once.
    out_grads = torch.autograd.grad(loglik.sum(), [z for _, _, _, z, _ in jobs], create_graph=create_graph,
                                    allow_unused=True, materialize_grads=True)
    grads: dict[str, torch.Tensor] = {}
    per_sample: dict[int, torch.Tensor] = {}
    with torch.set_grad_enabled(create_graph):
        for (shift, module, a, _, a_v), g in zip(jobs, out_grads):
            if not create_graph:
                a, a_v = a.detach(), (None if a_v is None else a_v.detach())
            if isinstance(module, nn.Linear):
                term = _linear_projection(shift, a, g, a_v)
                dims = tuple(range(1, g.dim() - 1))
            else:
                term = _conv_projection(module, shift, a, g, a_v)
                dims = tuple(range(2, g.dim()))
            key = id(shift)
            per_sample[key] = per_sample[key] + term if key in per_sample else term
            bias = module.bias
            if bias is not None and id(bias) in names:
                name = names[id(bias)]
                grads[name] = grads.get(name, 0) + (g.sum(dims) if dims else g)
        for shift, _, _, _, _ in jobs:
            name = names[id(shift.delta)]
            if name not in grads:
                # relu'(s + delta): a shift whose singular value is clipped at 0 gets no gradient.
                ps = per_sample[id(shift)]
                grads[name] = ps * (shift.s + shift.delta > 0).to(ps.dtype)
    return grads, {n: p for n, p in params.items() if n not in grads}


def spectral_fisher_trace(model: nn.Module, inputs: Any, targets: torch.Tensor,
                          likelihood: Likelihood,
                          params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The same number as :func:`fisher_trace` (and the same gradient), computed for the spectral
    shifts of Linear/Conv layers without per-sample weight gradients (module docstring); the
    parameters the fast path cannot cover go through :func:`fisher_trace`, so the sum is always
    the full trace over ``params`` (default: tuned). On a model without spectral shifts this is
    just :func:`fisher_trace`.

    Assumption that cannot be checked cheaply: a layer that sees a tensor whose dim 0 has size
    ``B`` sees the batch there (a sequence-first layout with ``T == B`` would be misattributed);
    :func:`verify_spectral_trace` compares both paths once on a real batch.
    """
    params = dict(params) if params is not None else tuned_parameters(model)
    batch = _batch_size(targets)
    grads, rest = _fast_per_sample_grads(model, inputs, targets, likelihood, params, True)
    trace = sum((g.pow(2).sum() for g in grads.values()),
                torch.zeros((), device=targets.device)) / batch
    if rest:
        trace = trace + fisher_trace(model, inputs, targets, likelihood, rest)
    return trace


def _shares_forward(model: nn.Module) -> bool:
    """Does the model compute the same function for the NLL (training flags as they are) as under
    :func:`independent_samples`? Not with batch norm normalising over the batch, nor with an active
    dropout module (the NLL and the trace would draw different masks)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training:
            return False
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            return False
        if isinstance(m, nn.MultiheadAttention) and m.training and m.dropout > 0:
            return False
    return True


def spectral_trace_step(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Likelihood,
                        params: dict[str, torch.Tensor]) -> tuple | None:
    """f-SFT's trace step from ONE forward: ``(nll, trace, grad nll, grad trace)``, with ``nll`` the
    batch-mean NLL and ``trace`` :func:`spectral_fisher_trace` (both 0-dim, with graph) and the
    gradients ``{name: tensor}`` over ``params``.

    The ghost-norm pass already has everything the NLL needs: its forward is the NLL's forward
    when the model computes the same function for independent samples (:func:`_shares_forward`),
    and the per-sample gradients it builds sum to the NLL's gradient (``grad mean_j nll_j =
    -(1/n) sum_j grad l_j``). So one forward, one backward (with graph) and one double backward
    give what otherwise takes an NLL forward and backward, the trace's forward, backward and
    double backward, and, for the step bound, the NLL's backward and the double backward again.
    ``None`` (nothing computed, or one forward wasted) where that does not hold: the model
    shares no forward, or some parameter is not covered by the ghost-norm path.
    """
    if not _shares_forward(model):
        return None
    batch = _batch_size(targets)
    loglik_out: list[torch.Tensor] = []
    grads, rest = _fast_per_sample_grads(model, inputs, targets, likelihood, params, True, loglik_out)
    if rest:
        return None
    loglik = loglik_out[0]
    nll = -loglik.mean()
    trace = sum(g.pow(2).sum() for g in grads.values()) / batch
    names = list(params)
    g_nll = {n: grads[n].detach().sum(0).div(-loglik.numel()) for n in names}
    g_trace = torch.autograd.grad(trace, [params[n] for n in names], allow_unused=True, materialize_grads=True)
    return nll, trace, g_nll, dict(zip(names, g_trace))


def verify_spectral_trace(model: nn.Module, inputs: Any, targets: torch.Tensor,
                          likelihood: Likelihood) -> float:
    """Relative difference between the fast and the vmap trace on one (small) batch; run once
    at setup on models whose layout the fast path's batch-on-dim-0 assumption may not fit."""
    fast = spectral_fisher_trace(model, inputs, targets, likelihood).detach()
    ref = fisher_trace(model, inputs, targets, likelihood).detach()
    return float((fast - ref).abs() / ref.abs().clamp_min(1e-30))
