"""Fine-Pruning (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018).

1. Rank the channels of the last convolutional layer by their mean activation on clean data:
   backdoor behaviour hides in channels that clean inputs leave dormant.
2. Prune channels in increasing order of activation until the clean *validation* accuracy falls by
   more than ``acc_drop`` (absolute); keep the deepest pruning within that budget.
3. Fine-tune the pruned network on the clean data with the core tuning loop (``ft`` preset), the
   pruned channels held at zero throughout.

"Pruning" a channel here makes its output exactly zero while the architecture stays the same: the
conv filter (and conv bias) and, when a BatchNorm directly normalises this conv, that BN's weight
and bias are zeroed (BN of a zero input with zero affine is zero). During fine-tuning the zeros
are kept by a parametrization ``w * keep`` that the core loop merges back into plain weights.
In pre-activation ResNets the last conv feeds a residual sum, so pruning it zeroes the conv's
contribution only, not the summed channel (as in the reference implementations).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize as P

from smoothpurify import SmoothPurifyError
from smoothpurify.defenses import register_defense
from smoothpurify.defenses.common import (Clock, accuracy, batches, check_clean_set, finetune, finish,
                                          resolve_options, working_copy)
from smoothpurify.model import call_model, conv_bn_pairs, last_conv_name
from smoothpurify.training import index_inputs

DEFAULTS: dict[str, Any] = {
    "acc_drop": 0.04,       # stop when clean validation accuracy falls more than 4 points (paper-like margin)
    "prune_step": 1,        # channels added per pruning step (the paper prunes one at a time)
    "max_ratio": 0.95,      # never prune more than this share of the layer's channels
    "layer": None,          # conv layer to prune; None = the last conv before the classifier
    "batch_size": 256,      # for activations and validation accuracy
    "finetune": {"epochs": 10, "lr": 0.01},  # ``ft`` preset overrides for step 3
}


class ChannelMask(nn.Module):
    """Parametrization ``w * keep`` over dim 0 (output channels); ``keep`` is a 0/1 buffer."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep.detach().clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.keep.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype)


def pruning_targets(model: nn.Module, layer: str, example: Any) -> list[tuple[str, str]]:
    """``(module, tensor)`` pairs that must be zero for a channel of ``layer`` to output zero."""
    conv = model.get_submodule(layer)
    targets = [(layer, "weight")] + ([(layer, "bias")] if conv.bias is not None else [])
    bn = dict(conv_bn_pairs(model, example)).get(layer)
    if bn is not None:
        targets += [(bn, "weight"), (bn, "bias")]
    return targets


def activation_module(model: nn.Module, layer: str, example: Any) -> str:
    """The module whose output is the layer's activation: its BN when one follows, else the conv."""
    return dict(conv_bn_pairs(model, example)).get(layer, layer)


@torch.no_grad()
def mean_activations(model: nn.Module, module_name: str, inputs: Any, targets: torch.Tensor,
                     batch_size: int) -> torch.Tensor:
    """Mean over clean samples and positions of relu(output) per channel (dim 1)."""
    total, count = None, 0
    module = model.get_submodule(module_name)
    grab: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _a, out: grab.append(out.detach()))
    model.eval()
    try:
        for x, _ in batches(inputs, targets, batch_size):
            grab.clear()
            call_model(model, x)
            out = torch.relu(grab[-1]).transpose(0, 1).reshape(grab[-1].shape[1], -1)
            total = out.sum(1) if total is None else total + out.sum(1)
            count += out.shape[1]
    finally:
        handle.remove()
    return total / count


def prune_search(model: nn.Module, module_name: str, order: torch.Tensor, inputs: Any, targets: torch.Tensor,
                 acc_drop: float, step: int, max_count: int, batch_size: int) -> dict[str, Any]:
    """Prune ``order[:k]`` for k = step, 2*step, ... until validation accuracy drops more than
    ``acc_drop``; returns the largest k within budget and the whole accuracy trace."""
    keep = torch.ones(len(order), device=order.device)
    module = model.get_submodule(module_name)
    handle = module.register_forward_hook(lambda _m, _a, out: out * keep.reshape(1, -1, *([1] * (out.dim() - 2))))
    try:
        base = accuracy(model, inputs, targets, batch_size)
        chosen, trace = 0, [{"pruned": 0, "val_acc": base}]
        for k in range(step, max_count + 1, step):
            keep.fill_(1.0)
            keep[order[:k]] = 0.0
            acc = accuracy(model, inputs, targets, batch_size)
            trace.append({"pruned": k, "val_acc": acc})
            if acc < base - acc_drop:
                break
            chosen = k
    finally:
        handle.remove()
    return {"base_val_acc": base, "pruned_count": chosen, "trace": trace}


@register_defense("fp")
def fine_pruning(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any, options: dict[str, Any],
                 *, seed: int = 0, device: str = "cpu", evaluate=None, eval_every: int | None = None,
                 progress: bool = True, augment=None):
    opts = resolve_options("fp", options, DEFAULTS)
    check_clean_set("fp", targets)
    if not 0 <= opts["acc_drop"] < 1:
        raise SmoothPurifyError(f"defense fp: acc_drop must be in [0, 1), got {opts['acc_drop']}")
    clock = Clock()
    work, inputs, targets = working_copy(model, device, inputs, targets)
    example = index_inputs(inputs, torch.arange(1, device=targets.device))
    layer = opts["layer"] or last_conv_name(work)
    act_name = activation_module(work, layer, example)
    acts = mean_activations(work, act_name, inputs, targets, opts["batch_size"])
    order = torch.argsort(acts)  # most dormant first
    channels = len(order)
    max_count = min(channels - 1, int(opts["max_ratio"] * channels))
    search = prune_search(work, act_name, order, inputs, targets, opts["acc_drop"], max(1, int(opts["prune_step"])),
                          max_count, opts["batch_size"])
    pruned = order[:search["pruned_count"]].sort().values
    keep = torch.ones(channels, device=acts.device)
    keep[pruned] = 0.0
    for module_name, tensor in pruning_targets(work, layer, example):
        P.register_parametrization(work.get_submodule(module_name), tensor, ChannelMask(keep))
    clock.end_setup()

    t0 = time.perf_counter()
    tuned = finetune(work, inputs, targets, likelihood, opts["finetune"], seed=seed, device=device, augment=augment,
                     progress=progress, evaluate=evaluate if eval_every else None, eval_every=eval_every)
    # The loop's own reporting (curves, final metrics) is not tuning time.
    clock.exclude(time.perf_counter() - t0 - tuned.record["seconds"]["total"])
    return finish("fp", model, tuned.model.state_dict(), clock, opts, seed, evaluate, tuned.record.get("curves"),
                  val=(inputs, targets), layer=layer, pruned_channels=pruned.tolist(), pruning=search,
                  finetune_val_loss=tuned.record["val_loss"])
