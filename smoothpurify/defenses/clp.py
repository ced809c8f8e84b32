"""Channel Lipschitzness-based Pruning (Zheng, Zhang, Wang & Sun, "Data-free Backdoor Removal based
on Channel Lipschitzness", ECCV 2022).

Data-free. For every convolution whose output a BatchNorm normalises directly, the upper bound of
the channel Lipschitz constant of channel ``k`` is

    UCLC_k = || W_k * |gamma_k| / sigma_k ||_2,

the spectral norm of the channel's kernel (reshaped ``in x (kh * kw)``) scaled by the BN factor
(``sigma_k = sqrt(running_var_k + eps)``). Channels that a trigger drives are unusually sensitive,
so within each layer those with ``UCLC_k > mean + u * std`` (sample std, as in the authors' code;
paper default ``u = 3``) are pruned by zeroing that BN channel's weight and bias (the channel then
outputs zero, as in the authors' code). No data is used: the signature accepts the clean set like
every defense, but only its shape is read, to trace which BN normalises which conv.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.defenses import register_defense
from smoothpurify.defenses.common import Clock, finish, resolve_options
from smoothpurify.model import conv_bn_pairs
from smoothpurify.training import index_inputs

DEFAULTS: dict[str, Any] = {
    "u": 3.0,
    "trace_pairs": True,     # find conv -> BN pairs by tracing a zero input (else by module order)
}


@torch.no_grad()
def channel_lipschitz(conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """UCLC of every output channel of ``conv`` followed by ``bn``."""
    w = conv.weight.detach().double()
    scale = bn.weight.detach().double().abs() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    kernels = (w * scale.reshape(-1, *([1] * (w.dim() - 1)))).reshape(w.shape[0], w.shape[1], -1)
    return torch.linalg.matrix_norm(kernels, ord=2).float()


def outliers(values: torch.Tensor, u: float) -> torch.Tensor:
    """Indices with value above ``mean + u * std`` (unbiased std; nothing for a single channel)."""
    if values.numel() < 2:
        return torch.empty(0, dtype=torch.long)
    return torch.nonzero(values > values.mean() + u * values.std()).flatten()


@register_defense("clp")
def channel_lipschitz_pruning(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                              options: dict[str, Any], *, seed: int = 0, device: str = "cpu", evaluate=None,
                              eval_every: int | None = None, progress: bool = True,
                              augment=None):  # unused: no fine-tuning through the core loop
    opts = resolve_options("clp", options, DEFAULTS)
    clock = Clock()
    work = copy.deepcopy(model).cpu().eval()
    example = None
    if opts["trace_pairs"] and inputs is not None:
        # Shape only: a zero tensor like one input sample, so no clean data reaches the defense.
        one = index_inputs(inputs, torch.arange(1))
        example = (tuple(torch.zeros_like(t, device="cpu") for t in one) if isinstance(one, (tuple, list))
                   else torch.zeros_like(one, device="cpu"))
    pairs = conv_bn_pairs(work, example)
    if not pairs:
        raise SmoothPurifyError("defense clp needs convolutions followed by BatchNorm; this model has none")
    clock.end_setup()
    pruned: dict[str, list[int]] = {}
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            bn = work.get_submodule(bn_name)
            idx = outliers(channel_lipschitz(work.get_submodule(conv_name), bn), float(opts["u"]))
            if len(idx):
                bn.weight[idx] = 0.0
                bn.bias[idx] = 0.0
                pruned[bn_name] = idx.tolist()
    return finish("clp", model, work.state_dict(), clock, opts, seed, evaluate, pairs=[list(p) for p in pairs],
                  pruned_channels=pruned, pruned_count=sum(len(v) for v in pruned.values()))
