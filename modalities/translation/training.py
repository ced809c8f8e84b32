"""Training of the seq2seq models: Adam on the token-averaged NLL with gradient clipping.

kit's plain loop (SGD on the per-sample mean of summed token NLLs) diverges on sequences: a
sentence's loss is a sum over ~30 tokens, so its gradients are ~30x a classifier's. Here the loss is
divided by the number of real target tokens in the batch (fairseq's sentence-averaged vs
token-averaged distinction) and gradients are clipped (Gehring et al. 2017 clip at 0.1 with NAG;
Adam with a norm of 1 is the common CPU-friendly choice).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from smoothpurify import SmoothPurifyError
from smoothpurify.likelihood import Likelihood
from smoothpurify.model import call_model
from smoothpurify.training import index_inputs, num_samples, to_device


def trim(x: Any, y: torch.Tensor, pad: int) -> tuple[Any, torch.Tensor]:
    """Drop the padding columns a batch does not use (splits are padded to their longest sentence)."""
    src, prev = x
    s = int(src.ne(pad).sum(1).max().clamp_min(1))
    t = int(y.ne(pad).sum(1).max().clamp_min(1))
    return (src[:, :s], prev[:, :t]), y[:, :t]


def train_seq2seq(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Likelihood, pad: int, *,
                  epochs: int, lr: float, batch_size: int, weight_decay: float = 0.0, seed: int = 0,
                  clip: float = 1.0, augment: Callable | None = None, device: str = "cpu", desc: str = "train",
                  progress: bool = True) -> list[float]:
    """Adam with linear warm-up (first 5 % of steps) and cosine decay; returns per-epoch mean token NLL."""
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = num_samples(inputs)
    steps = max(1, epochs * math.ceil(n / batch_size))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(total=steps, desc=desc, disable=None if progress else True, leave=False, unit="step")
    for epoch in range(epochs):
        total, tokens = 0.0, 0
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            x, y = trim(index_inputs(inputs, idx), targets[idx], pad)
            if augment is not None:
                x = augment(x, gen)
            y = y.to(device)
            count = int(y.ne(pad).sum().clamp_min(1))
            loss = likelihood.nll(call_model(model, to_device(x, device)), y).sum() / count
            if not torch.isfinite(loss):
                raise SmoothPurifyError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            total, tokens = total + loss.item() * count, tokens + count
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        history.append(total / max(tokens, 1))
    bar.close()
    model.eval()
    return history
