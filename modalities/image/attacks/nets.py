"""Shared machinery of the learned-trigger attacks: tiny generator nets, weight (un)packing, a joint
training loop and PGD.

Generator weights are the trigger: they are flattened into the attack's ``trigger`` dict under a
``net.`` prefix so that ``state_dict`` -> safetensors -> ``load_state_dict`` rebuilds the exact
generator at evaluation time (no pickles, no side files).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from modalities.contract import Attack
from modalities.image.augment import random_shift

PREFIX = "net."


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for network init without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def conv_net(cin: int, cout: int, width: int = 16, depth: int = 3) -> nn.Sequential:
    """Fully convolutional (3x3, 'same' padding): works at 12x12, 28x28 and 32x32 alike.

    No batch norm: per-sample generator outputs must not depend on the rest of the batch.
    """
    layers: list[nn.Module] = []
    c = cin
    for _ in range(depth - 1):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
        c = width
    layers.append(nn.Conv2d(c, cout, 3, padding=1))
    return nn.Sequential(*layers)


def pack(nets: nn.Module) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v.detach().cpu().clone() for k, v in nets.state_dict().items()}


def unpack(nets: nn.Module, state: dict[str, torch.Tensor]) -> None:
    nets.load_state_dict({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)})


class NetAttack(Attack):
    """An attack whose trigger is (partly) a set of small networks, ``self.nets``.

    Subclasses implement ``build_nets`` (called under the attack's seed, so the initial weights are
    deterministic) and may add plain tensors with ``extra_trigger``.
    """

    def build_nets(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def extra_trigger(self) -> dict[str, torch.Tensor]:
        return {}

    def make_trigger(self) -> dict[str, torch.Tensor]:
        with seeded(self.seed):
            self.nets = nn.ModuleDict(self.build_nets())
        self.nets.eval().requires_grad_(False)
        return {**pack(self.nets), **self.extra_trigger()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.trigger.update(pack(self.nets))  # the nets may have been trained since make_trigger
        return super().state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        unpack(self.nets, self.trigger)


# ----------------------------------------------------------------------------- training
def settings(context: dict[str, Any]) -> dict[str, Any]:
    t = dict(context.get("train") or {})
    return {"epochs": int(t.get("epochs", 4)), "lr": float(t.get("lr", 0.05)),
            "batch_size": int(t.get("batch_size", 128)), "momentum": float(t.get("momentum", 0.9)),
            "weight_decay": float(t.get("weight_decay", 5e-4)), "augment": bool(t.get("augment", False)),
            "device": context.get("device", "cpu"), "seed": int(context.get("seed", 0))}


def joint_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: dict[str, Any],
                step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor],
                epochs: int | None = None, on_epoch: Callable[[int], None] | None = None,
                generator_opt: torch.optim.Optimizer | None = None) -> list[float]:
    """The plain SGD + cosine loop of :func:`smoothpurify.training.train`, with the batch loss
    computed by ``step(xb, yb, idx, epoch)`` so an attack can poison on the fly. When
    ``generator_opt`` is given it steps on the same backward (joint classifier + generator
    training, one backward per batch). Returns the mean loss per epoch.
    """
    s = settings(context)
    epochs = epochs or s["epochs"]
    dev = s["device"]
    augment = random_shift if s["augment"] else None
    model.to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    steps = epochs * math.ceil(len(y) / s["batch_size"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    gen = torch.Generator().manual_seed(s["seed"])
    history = []
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch)
            model.train()
        total = 0.0
        for idx in torch.randperm(len(y), generator=gen).split(s["batch_size"]):
            xb, yb = x[idx], y[idx]
            if augment is not None:
                xb = augment(xb, gen)
            loss = step(xb.to(dev), yb.to(dev), idx, epoch)
            if not torch.isfinite(loss):
                from smoothpurify import SmoothPurifyError
                raise SmoothPurifyError(f"joint attack training: loss became {loss.item()} at epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            if generator_opt is not None:
                generator_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if generator_opt is not None:
                generator_opt.step()
            sched.step()
            total += loss.item() * len(idx)
        history.append(total / len(y))
    model.eval()
    return history


def pgd(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float, steps: int,
        targeted: bool = False, gen: torch.Generator | None = None, step_size: float | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """L_inf PGD (Madry et al. 2018) with a random start; the model's mode is left as it is.

    Untargeted: ascend the loss of ``labels``; targeted: descend it. ``loss_fn(logits, labels)``
    replaces cross-entropy (FBA maximises neuron activations instead).
    """
    loss_fn = loss_fn or (lambda out, t: F.cross_entropy(out, t))
    step_size = step_size or 2.5 * eps / max(1, steps)
    noise = torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1
    adv = (x + eps * noise).clamp(0, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)  # only the input needs a gradient
    try:
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = loss_fn(model(adv), labels)
            (grad,) = torch.autograd.grad(loss, adv)
            direction = -grad.sign() if targeted else grad.sign()
            adv = torch.min(torch.max(adv.detach() + step_size * direction, x - eps), x + eps).clamp(0, 1)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return adv.detach()


def pair_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).pow(2).mean(1).add(1e-12).sqrt()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Input-aware diversity term (Nguyen & Tran 2020, eq. 3): ||x - x'|| / ||g(x) - g(x')||.

    Small when two different inputs get two different triggers.
    """
    return (pair_distance(x1, x2) / (pair_distance(g1, g2) + 1e-3)).mean()
