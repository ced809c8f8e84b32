"""Plain supervised training and batched prediction over in-memory tensors (any modality).

Used to train the benign and the backdoored models; purification has its own loop
(:mod:`smoothpurify.purify`) because its objective and parametrization vary.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from smoothpurify.accel import FiniteGuard, resolve_accel
from smoothpurify.likelihood import Likelihood
from smoothpurify.model import call_model


def index_inputs(inputs: Any, idx: torch.Tensor) -> Any:
    """Select rows of a tensor or of every tensor in a tuple."""
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(t[idx] for t in inputs)
    return inputs[idx]


def num_samples(inputs: Any) -> int:
    return len(inputs[0]) if isinstance(inputs, (tuple, list)) else len(inputs)


def to_device(inputs: Any, device: torch.device | str) -> Any:
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(t.to(device) for t in inputs)
    return inputs.to(device)


def train(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Likelihood, *, epochs: int,
          lr: float, batch_size: int, momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0,
          augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
          device: str = "cpu", desc: str = "train", progress: bool = True, precision: str = "auto") -> list[float]:
    """SGD with momentum and a cosine schedule; returns the mean training loss of each epoch.

    ``precision``: the device's speed-ups (:mod:`smoothpurify.accel`); on a CPU ``"auto"`` changes nothing.
    """
    acc = resolve_accel(precision, device)
    acc.model(model.to(device)).train()
    guard = FiniteGuard(acc.defer_checks, desc, "lower the learning rate")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = num_samples(inputs)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(total=steps, desc=desc, disable=None if progress else True, leave=False, unit="step")
    for epoch in range(epochs):
        order, total, losses = torch.randperm(n, generator=gen), 0.0, []
        for idx in order.split(batch_size):
            x, y = index_inputs(inputs, idx), targets[idx]
            if augment is not None:
                x = augment(x, gen)
            with acc.autocast_context():
                loss = likelihood.nll(call_model(model, acc.inputs(to_device(x, device))), y.to(device)).mean()
            guard.check(loss, f"epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if acc.defer_checks:  # summed on the device, read once per epoch
                losses.append(loss.detach() * len(idx))
            else:
                total += loss.item() * len(idx)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        guard.flush()
        if losses:
            total = float(torch.stack(losses).double().sum())
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / n:.3f}")
        history.append(total / n)
    bar.close()
    if acc.channels_last:  # saved with safetensors, which stores contiguous tensors only
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: Any, batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    was_training = model.training
    model.eval()
    n = num_samples(inputs)
    outs = [call_model(model, to_device(index_inputs(inputs, idx), device)).cpu()
            for idx in torch.arange(n).split(batch_size)]
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def predict(model: nn.Module, inputs: Any, batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    return predict_logits(model, inputs, batch_size, device).argmax(dim=-1)
