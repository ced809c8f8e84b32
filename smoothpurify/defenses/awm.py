"""Adversarial Weight Masking (Chai & Chen, "One-shot Neural Backdoor Erasing via Adversarial
Weight Masking", NeurIPS 2022), Algorithm 1.

A soft mask ``m in [0, 1]`` of the same shape as every conv weight (the authors mask conv layers;
``mask_linear`` adds the linear layers) is learned on the clean data, the network computing with
``m * w``. Each epoch:

1. inner (trigger recovery): a universal additive trigger ``Delta`` (one input-shaped tensor, zero
   start) is driven by ``T`` steps of gradient ascent (lr ``eta1``) on ``L(f(x + Delta; m*w), y)``,
   then projected onto the L1 ball of radius ``tau``: ``Delta *= min(1, tau / ||Delta||_1)``;
2. outer (masking): ``T`` steps (lr ``eta2``, Adam as in the authors' code, decayed by 0.9 per
   epoch) on ``alpha * L(f(x; m*w), y) + beta * L(f(clip(x + Delta); m*w), y) + gamma * ||m||_1``,
   then ``m`` is clipped to [0, 1].

``T`` is ``inner_epochs`` passes worth of batches (authors: 5). The result folds ``m * w`` into
the weights, so the model keeps its architecture. Defaults (paper / authors' code): alpha 0.9,
beta 0.1, gamma 1e-8, tau 1000 (an L1 radius for 3x32x32 inputs in [0, 1]), eta1 10 (SGD),
eta2 1e-2, 20 epochs, batch 128. BN runs in eval mode throughout (the authors' ``model.eval()``).

The paper's trigger is the additive, L1-bounded ``Delta`` above; a Neural-Cleanse style
mask-and-pattern trigger is not what Algorithm 1 optimises, so it is not offered.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from smoothpurify import SmoothPurifyError
from smoothpurify.defenses import register_defense
from smoothpurify.defenses.common import (Clock, Curves, check_clean_set, descend, finish, resolve_options,
                                          sample_batch, steps_per_epoch, working_copy)
from smoothpurify.model import CONV_TYPES
from smoothpurify.training import num_samples

DEFAULTS: dict[str, Any] = {
    "epochs": 20,
    "inner_epochs": 5,       # T = inner_epochs * batches per pass
    "batch_size": 128,
    "alpha": 0.9,
    "beta": 0.1,
    "gamma": 1e-8,
    "tau": 1000.0,
    "eta1": 10.0,
    "eta2": 1e-2,
    "lr_decay": 0.9,         # eta2 multiplied by this after every epoch
    "mask_linear": False,
    "clip_inputs": [0.0, 1.0],  # valid input range for x + Delta (null: no clipping)
}


class WeightMasks(nn.Module):
    """One mask per masked weight; ``forward`` runs the model with ``mask * weight``."""

    def __init__(self, model: nn.Module, mask_linear: bool):
        super().__init__()
        types = CONV_TYPES + ((nn.Linear,) if mask_linear else ())
        self.names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, types)]
        if not self.names:
            raise SmoothPurifyError("defense awm found no conv weight to mask (set mask_linear: true for MLPs)")
        weights = dict(model.named_parameters())
        self.masks = nn.ParameterList([nn.Parameter(torch.ones_like(weights[n])) for n in self.names])

    def forward(self, model: nn.Module, x: Any) -> torch.Tensor:
        weights = dict(model.named_parameters())
        params = {n: weights[n] * m for n, m in zip(self.names, self.masks)}
        return functional_call(model, params, tuple(x) if isinstance(x, (tuple, list)) else (x,))

    def l1(self) -> torch.Tensor:
        return sum(m.abs().sum() for m in self.masks)

    def clip(self) -> None:
        with torch.no_grad():
            for m in self.masks:
                m.clamp_(0.0, 1.0)

    @torch.no_grad()
    def folded(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with every masked weight replaced by ``mask * weight``."""
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for n, m in zip(self.names, self.masks):
            state[n] = state[n] * m
        return state


def _add(x: Any, delta: torch.Tensor, clip: list[float] | None) -> Any:
    first = x[0] if isinstance(x, (tuple, list)) else x
    new = first + delta if clip is None else (first + delta).clamp(clip[0], clip[1])
    return type(x)((new, *x[1:])) if isinstance(x, (tuple, list)) else new


def learn_masks(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any, opts: dict[str, Any],
                seed: int, progress: bool, curves: Curves | None = None) -> tuple[WeightMasks, list[float]]:
    masks = WeightMasks(model, bool(opts["mask_linear"])).to(targets.device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    if not first.is_floating_point():
        raise SmoothPurifyError("defense awm recovers an input-space trigger and needs floating-point inputs")
    opt = torch.optim.Adam(masks.masks.parameters(), lr=opts["eta2"])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=opts["lr_decay"])
    gen = torch.Generator().manual_seed(seed)
    steps = int(opts["inner_epochs"]) * steps_per_epoch(num_samples(inputs), opts["batch_size"])
    epochs, clip, norms = int(opts["epochs"]), opts["clip_inputs"], []
    bar = tqdm(total=epochs * 2 * steps, desc="purify awm", disable=None if progress else True, leave=False)
    for epoch in range(1, epochs + 1):
        delta = torch.zeros((1, *first.shape[1:]), device=first.device, requires_grad=True)
        delta_opt = torch.optim.SGD([delta], lr=opts["eta1"])
        for _ in range(steps):  # phase 1: worst-case trigger for the current masked model
            x, y = sample_batch(inputs, targets, opts["batch_size"], gen)
            loss = -likelihood.nll(masks(model, _add(x, delta, None)), y).mean()
            delta_opt.zero_grad(set_to_none=True)
            loss.backward()
            delta_opt.step()
            bar.update(1)
        with torch.no_grad():
            delta_star = delta * min(1.0, opts["tau"] / max(float(delta.abs().sum()), 1e-12))
        norms.append(float(delta_star.abs().sum()))
        for _ in range(steps):  # phase 2: masks that keep clean accuracy and ignore the trigger
            x, y = sample_batch(inputs, targets, opts["batch_size"], gen)
            loss = (opts["alpha"] * likelihood.nll(masks(model, x), y).mean()
                    + opts["beta"] * likelihood.nll(masks(model, _add(x, delta_star, clip)), y).mean()
                    + opts["gamma"] * masks.l1())
            descend(opt, loss, "awm", f"epoch {epoch}", "lower eta2")
            masks.clip()
            bar.update(1)
        sched.step()
        if curves is not None and curves.evaluate is not None:
            state = masks.folded(model)
            probe = working_copy(model, str(targets.device), inputs, targets)[0]
            probe.load_state_dict(state)
            curves(probe, epoch, epochs, trigger_l1=norms[-1])
    bar.close()
    return masks, norms


@register_defense("awm")
def adversarial_weight_masking(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                               options: dict[str, Any], *, seed: int = 0, device: str = "cpu", evaluate=None,
                               eval_every: int | None = None, progress: bool = True,
                               augment=None):  # unused: no fine-tuning through the core loop
    opts = resolve_options("awm", options, DEFAULTS)
    check_clean_set("awm", targets)
    clock = Clock()
    work, inputs, targets = working_copy(model, device, inputs, targets)
    clock.end_setup()
    curves = Curves(evaluate, eval_every, clock)
    masks, norms = learn_masks(work, inputs, targets, likelihood, opts, seed, progress, curves)
    state = masks.folded(work)
    flat = torch.cat([m.detach().flatten() for m in masks.masks])
    return finish("awm", model, state, clock, opts, seed, evaluate, curves, val=(inputs, targets),
                  masked_weights=masks.names, mask_mean=float(flat.mean()),
                  mask_zero_share=float((flat == 0).float().mean()), trigger_l1=norms)
