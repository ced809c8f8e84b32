"""Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Perturbation Exposes Backdoors in
Deep Neural Networks" / "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021).

Neurons are BatchNorm channels. Each gets a mask ``m in [0, 1]`` on its scale and, during the
adversarial step, multiplicative perturbations ``delta, xi in [-eps, eps]``: the channel computes
``gamma * (m + delta) * xhat + beta * (1 + xi)``. Backdoor neurons are the ones whose
perturbation most easily flips predictions, so the masks are learned by

    min_m  alpha * L(m, 0)  +  (1 - alpha) * max_{delta, xi} L(m + delta, xi)

on the clean data (one signed-gradient-like ascent step on the perturbations from a random start,
then one SGD step on the masks, clipped to [0, 1]; paper Alg. 1). Pruning sets gamma to zero for
the chosen neurons, as the authors' code does (the channel then outputs its constant beta):
either every neuron whose mask is below ``threshold`` (paper: 0.2), or the lowest-mask neurons by
count, the count chosen as the largest whose clean *validation* accuracy stays within ``acc_drop``.

Paper settings: 2000 iterations, batch 128, mask lr 0.2 (SGD, momentum 0.9), eps 0.4, one
perturbation step, alpha 0.2, threshold 0.2. Models without BatchNorm are refused.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from smoothpurify import SmoothPurifyError
from smoothpurify.defenses import register_defense
from smoothpurify.defenses.common import (Clock, accuracy, check_clean_set, descend, finish, resolve_options,
                                          sample_batch, working_copy)
from smoothpurify.model import norm_layers

DEFAULTS: dict[str, Any] = {
    "iterations": 2000,
    "batch_size": 128,
    "mask_lr": 0.2,
    "momentum": 0.9,
    "eps": 0.4,              # perturbation budget
    "steps": 1,              # ascent steps on the perturbation per iteration
    "alpha": 0.2,            # weight of the natural loss (1 - alpha: robust loss)
    "prune_by": "threshold",  # threshold | number
    "threshold": 0.2,
    "acc_drop": 0.05,        # prune_by=number: largest count within this clean-accuracy drop
    "prune_step": None,      # prune_by=number: neurons per step (None: 1% of all neurons)
    "max_ratio": 0.5,        # prune_by=number: at most this share of all neurons
}


class NeuronPerturbation(nn.Module):
    """Masks and perturbations of every BN channel, and the forward pass that applies them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = [n for n, _ in norm_layers(model)]
        if not self.names:
            raise SmoothPurifyError("defense anp needs BatchNorm layers with affine parameters "
                                    "(its neurons are BN channels); this model has none")
        sizes = [m.num_features for _, m in norm_layers(model)]
        self.masks = nn.ParameterList([nn.Parameter(torch.ones(s)) for s in sizes])
        self.noise_w = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in sizes])
        self.noise_b = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in sizes])

    def reset_noise(self, eps: float, generator: torch.Generator) -> None:
        with torch.no_grad():
            for p in [*self.noise_w, *self.noise_b]:
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1).mul_(eps))

    def clip(self, eps: float) -> None:
        with torch.no_grad():
            for m in self.masks:
                m.clamp_(0.0, 1.0)
            for p in [*self.noise_w, *self.noise_b]:
                p.clamp_(-eps, eps)

    def forward(self, model: nn.Module, x: Any, perturbed: bool) -> torch.Tensor:
        params = {}
        for i, name in enumerate(self.names):
            bn = model.get_submodule(name)
            coeff = self.masks[i] + self.noise_w[i] if perturbed else self.masks[i]
            params[f"{name}.weight"] = bn.weight * coeff
            params[f"{name}.bias"] = bn.bias * (1 + self.noise_b[i]) if perturbed else bn.bias
        args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        return functional_call(model, params, args)

    def flat_masks(self) -> torch.Tensor:
        return torch.cat([m.detach() for m in self.masks])

    def locate(self, flat_index: torch.Tensor) -> list[tuple[str, int]]:
        sizes = torch.tensor([len(m) for m in self.masks])
        ends = sizes.cumsum(0)
        out = []
        for i in flat_index.tolist():
            layer = int(torch.searchsorted(ends, torch.tensor(i), right=True))
            out.append((self.names[layer], i - int(ends[layer] - sizes[layer])))
        return out


def prune_neurons(model: nn.Module, neurons: list[tuple[str, int]]) -> None:
    """Zero gamma of each ``(bn name, channel)`` in place."""
    with torch.no_grad():
        for name, ch in neurons:
            model.get_submodule(name).weight[ch] = 0.0


def learn_masks(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any, opts: dict[str, Any],
                seed: int, progress: bool) -> NeuronPerturbation:
    """ANP's mask optimisation (model weights frozen, BN in train mode as in the paper's code)."""
    pert = NeuronPerturbation(model).to(targets.device)
    for p in model.parameters():
        p.requires_grad_(False)
    eps, steps = float(opts["eps"]), max(1, int(opts["steps"]))
    mask_opt = torch.optim.SGD(pert.masks.parameters(), lr=opts["mask_lr"], momentum=opts["momentum"])
    noise_params = [*pert.noise_w, *pert.noise_b]
    noise_opt = torch.optim.SGD(noise_params, lr=eps / steps) if eps > 0 else None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for it in tqdm(range(int(opts["iterations"])), desc="purify anp", disable=None if progress else True,
                   leave=False):
        x, y = sample_batch(inputs, targets, opts["batch_size"], gen)
        if noise_opt is not None:
            pert.reset_noise(eps, gen)
            for _ in range(steps):  # maximise the loss over the perturbations
                noise_opt.zero_grad(set_to_none=True)
                (-likelihood.nll(pert(model, x, True), y).mean()).backward()
                noise_opt.step()
                pert.clip(eps)
        loss_rob = likelihood.nll(pert(model, x, True), y).mean() if noise_opt is not None else 0.0
        loss_nat = likelihood.nll(pert(model, x, False), y).mean()
        loss = opts["alpha"] * loss_nat + (1 - opts["alpha"]) * loss_rob
        descend(mask_opt, loss, "anp", f"iteration {it}", "lower mask_lr")
        pert.clip(eps)
    model.eval()
    return pert


@register_defense("anp")
def adversarial_neuron_pruning(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                               options: dict[str, Any], *, seed: int = 0, device: str = "cpu", evaluate=None,
                               eval_every: int | None = None, progress: bool = True,
                               augment=None):  # unused: no fine-tuning through the core loop
    opts = resolve_options("anp", options, DEFAULTS)
    check_clean_set("anp", targets)
    if opts["prune_by"] not in ("threshold", "number"):
        raise SmoothPurifyError(f"defense anp: prune_by must be threshold or number, got {opts['prune_by']!r}")
    clock = Clock()
    scratch, inputs, targets = working_copy(model, device, inputs, targets)
    base_acc = accuracy(scratch, inputs, targets)
    clock.end_setup()

    pert = learn_masks(scratch, inputs, targets, likelihood, opts, seed, progress)
    masks = pert.flat_masks().cpu()
    order = torch.argsort(masks)
    # Prune a fresh copy: the mask optimisation ran BN in train mode, which moved running stats.
    pruned_model, _, _ = working_copy(model, device, inputs, targets)
    trace = []
    if opts["prune_by"] == "threshold":
        chosen = int((masks < opts["threshold"]).sum())
    else:
        step = int(opts["prune_step"] or max(1, len(masks) // 100))
        chosen = 0
        for k in range(step, int(opts["max_ratio"] * len(masks)) + 1, step):
            trial = working_copy(model, device, inputs, targets)[0]
            prune_neurons(trial, pert.locate(order[:k]))
            acc = accuracy(trial, inputs, targets)
            trace.append({"pruned": k, "val_acc": acc})
            if acc < base_acc - opts["acc_drop"]:
                break
            chosen = k
    neurons = pert.locate(order[:chosen])
    prune_neurons(pruned_model, neurons)
    by_layer: dict[str, list[int]] = {}
    for name, ch in neurons:
        by_layer.setdefault(name, []).append(ch)
    return finish("anp", model, pruned_model.state_dict(), clock, opts, seed, evaluate,
                  pruned_neurons={k: sorted(v) for k, v in by_layer.items()}, pruned_count=chosen,
                  total_neurons=len(masks), mask_min=float(masks.min()), mask_mean=float(masks.mean()),
                  base_val_acc=base_acc, pruning_trace=trace, val=(inputs, targets))
