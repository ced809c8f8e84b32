"""Mode Connectivity Repair (Zhao, Chen, Das, Ramamurthy & Lin, "Bridging Mode Connectivity in Loss
Landscapes and Adversarial Robustness", ICLR 2020), with the curve of Garipov et al. (NeurIPS 2018).

Two endpoints, ``w0`` = the backdoored model and ``w1`` = a copy of it fine-tuned on the clean data
(core loop, ``ft`` preset), are joined by the quadratic Bezier curve

    phi(t) = (1 - t)^2 w0 + 2 t (1 - t) theta + t^2 w1,     t in [0, 1],

whose control point ``theta`` (initialised at the midpoint) is trained on the clean data by
sampling ``t ~ U[0, 1]`` for every batch. The paper finds that the path, trained on clean data
only, leaves the backdoor behind in its interior while clean accuracy stays high. The purified
model is ``phi(t)`` at a fixed ``t`` (option) or at the ``t`` chosen on clean validation accuracy:
among ``t_grid`` (interior points; the endpoints are the inputs), the point closest to the middle
of the path whose accuracy is within ``acc_tolerance`` of the best.

Batch norm: every BN affine parameter lies on the curve like any weight; running statistics are
not parameters, so (as Garipov et al. do) they are recomputed for each evaluated point by a
pass over the clean data in train mode with a cumulative average. :meth:`BezierCurve.state_at`
without data interpolates the endpoints' statistics linearly instead, so ``t = 0`` and ``t = 1``
reproduce the endpoints exactly.

Defaults: 100 epochs of curve training (SGD lr 0.01, momentum 0.9, weight decay 5e-4, as in
curve training), fine-tuned endpoint from the ``ft`` preset.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from smoothpurify import SmoothPurifyError
from smoothpurify.defenses import register_defense
from smoothpurify.defenses.common import (Clock, Curves, accuracy, batches, check_clean_set, descend,
                                          finetune, finish, resolve_options, steps_per_epoch, working_copy)
from smoothpurify.model import call_model
from smoothpurify.training import num_samples

DEFAULTS: dict[str, Any] = {
    "finetune": {},          # ``ft`` preset overrides for the fine-tuned endpoint
    "epochs": 100,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "batch_size": 128,
    "t": None,               # fixed point on the curve; None = choose on clean validation accuracy
    "t_grid": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
    "acc_tolerance": 0.02,
}


class BezierCurve(nn.Module):
    """Quadratic Bezier curve between two models of one architecture; ``theta`` is trainable."""

    def __init__(self, start: nn.Module, end: nn.Module):
        super().__init__()
        if list(start.state_dict()) != list(end.state_dict()):
            raise SmoothPurifyError("defense mcr: the two endpoints have different architectures")
        self.skeleton = copy.deepcopy(start)
        for p in self.skeleton.parameters():
            p.requires_grad_(False)
        self.names = [n for n, _ in start.named_parameters()]
        p0, p1 = dict(start.named_parameters()), dict(end.named_parameters())
        self.w0 = {n: p0[n].detach().clone() for n in self.names}
        self.w1 = {n: p1[n].detach().clone() for n in self.names}
        self.theta = nn.ParameterList([nn.Parameter((self.w0[n] + self.w1[n]) / 2) for n in self.names])
        b0, b1 = dict(start.named_buffers()), dict(end.named_buffers())
        self.b0 = {n: b.detach().clone() for n, b in b0.items()}
        self.b1 = {n: b1[n].detach().clone() for n in b0}

    def params_at(self, t: float) -> dict[str, torch.Tensor]:
        c0, c1, c2 = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
        return {n: c0 * self.w0[n] + c1 * th + c2 * self.w1[n] for n, th in zip(self.names, self.theta)}

    def buffers_at(self, t: float) -> dict[str, torch.Tensor]:
        # Statistics interpolate linearly; counters (num_batches_tracked) are taken from the start.
        return {n: ((1 - t) * b + t * self.b1[n]) if b.is_floating_point() else b.clone()
                for n, b in self.b0.items()}

    def forward(self, t: float, x: Any) -> torch.Tensor:
        """The model at ``t`` (the skeleton's mode decides BN batch vs running statistics)."""
        return functional_call(self.skeleton, self.params_at(t), tuple(x) if isinstance(x, (tuple, list)) else (x,))

    @torch.no_grad()
    def state_at(self, t: float) -> dict[str, torch.Tensor]:
        params = {n: v.detach().clone() for n, v in self.params_at(t).items()}
        return {k: (params[k] if k in params else self.buffers_at(t)[k])
                for k in self.skeleton.state_dict()}

    @torch.no_grad()
    def model_at(self, t: float, inputs: Any = None, targets: torch.Tensor | None = None,
                 batch_size: int = 256) -> nn.Module:
        """A plain model at ``t``; with clean data its BN running statistics are recomputed."""
        model = copy.deepcopy(self.skeleton)
        model.load_state_dict(self.state_at(t))
        if inputs is not None:
            recompute_bn(model, inputs, targets, batch_size)
        return model.eval()


@torch.no_grad()
def recompute_bn(model: nn.Module, inputs: Any, targets: torch.Tensor, batch_size: int) -> None:
    """Running statistics of every BN as the cumulative average over the clean data."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x, _ in batches(inputs, targets, batch_size):
        call_model(model, x)
    for m, mom in zip(norms, saved):
        m.momentum = mom
    model.eval()


def train_curve(curve: BezierCurve, inputs: Any, targets: torch.Tensor, likelihood: Any, opts: dict[str, Any],
                seed: int, progress: bool, curves: Curves | None = None) -> list[float]:
    opt = torch.optim.SGD(curve.theta.parameters(), lr=opts["lr"], momentum=opts["momentum"],
                          weight_decay=opts["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    n, epochs, history = num_samples(inputs), int(opts["epochs"]), []
    bar = tqdm(total=epochs * steps_per_epoch(n, opts["batch_size"]), desc="purify mcr",
               disable=None if progress else True, leave=False)
    for epoch in range(1, epochs + 1):
        curve.skeleton.train()
        total = 0.0
        for x, y in batches(inputs, targets, opts["batch_size"], gen):
            t = float(torch.rand((), generator=gen))
            loss = likelihood.nll(curve(t, x), y).mean()
            total += descend(opt, loss, "mcr", f"epoch {epoch}", "lower lr") * len(y)
            bar.update(1)
        history.append(total / n)
        if curves is not None and curves.evaluate is not None:
            curves(curve.model_at(0.5, inputs, targets), epoch, epochs, train_loss=history[-1])
    bar.close()
    return history


def choose_t(accs: dict[float, float], tolerance: float) -> float:
    """The grid point nearest the middle of the path among those within ``tolerance`` of the best."""
    best = max(accs.values())
    ok = [t for t, a in accs.items() if a >= best - tolerance]
    # Ties (up to float noise) go to the larger t: further from the backdoored endpoint.
    return min(ok, key=lambda t: (round(abs(t - 0.5), 9), -t))


@register_defense("mcr")
def mode_connectivity_repair(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                             options: dict[str, Any], *, seed: int = 0, device: str = "cpu", evaluate=None,
                             eval_every: int | None = None, progress: bool = True, augment=None):
    opts = resolve_options("mcr", options, DEFAULTS)
    check_clean_set("mcr", targets)
    if opts["t"] is not None and not 0 <= float(opts["t"]) <= 1:
        raise SmoothPurifyError(f"defense mcr: t must be in [0, 1], got {opts['t']}")
    clock = Clock()
    start, inputs, targets = working_copy(model, device, inputs, targets)
    t0 = time.perf_counter()
    tuned = finetune(start, inputs, targets, likelihood, opts["finetune"], seed=seed, device=device, augment=augment,
                     progress=progress)
    clock.exclude(time.perf_counter() - t0 - tuned.record["seconds"]["total"])
    curve = BezierCurve(start.eval(), tuned.model.to(device).eval())
    clock.end_setup()

    curves = Curves(evaluate, eval_every, clock)
    history = train_curve(curve, inputs, targets, likelihood, opts, seed, progress, curves)
    accs: dict[float, float] = {}
    if opts["t"] is None:
        grid = sorted(float(t) for t in opts["t_grid"])
        accs = {t: accuracy(curve.model_at(t, inputs, targets, opts["batch_size"]), inputs, targets) for t in grid}
        t_star = choose_t(accs, opts["acc_tolerance"])
    else:
        t_star = float(opts["t"])
    final = curve.model_at(t_star, inputs, targets, opts["batch_size"])
    return finish("mcr", model, final.state_dict(), clock, opts, seed, evaluate, curves, val=(inputs, targets),
                  t=t_star, val_acc_by_t={str(t): a for t, a in accs.items()}, curve_train_loss=history,
                  endpoint_val_acc={"start": accuracy(start, inputs, targets),
                                    "end": accuracy(tuned.model, inputs, targets)})
