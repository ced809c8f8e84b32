"""Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation:
Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021).

1. Teacher: a copy of the backdoored model fine-tuned on the clean data (core loop, ``ft`` preset).
2. Student: the backdoored model trained on the clean data with
   ``CE + sum_k beta_k * || A(F_s^k) - A(F_t^k) ||_2^2`` (mean over samples and positions), where
   ``A(F) = sum_c |F_c|^p / || sum_c |F_c|^p ||_2`` is the spatial attention map of a feature map
   (paper Eq. 1-3, p = 2), taken at the outputs of the network's last feature stages (WRN's three
   groups in the paper; resolved generically by :func:`smoothpurify.model.feature_stages`).

Paper settings: 5% of the training data, teacher fine-tuned 10 epochs, student 20 epochs, SGD
(momentum 0.9, weight decay 1e-4), betas 500 / 1000 / 1000 for WRN-16-1's groups 1 / 2 / 3, p = 2.
The paper starts at lr 0.1 on 2,500 CIFAR images; we default to 0.01 (the ``ft`` preset's rate)
because our clean sets are a few hundred samples. Every value is an option.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from smoothpurify import SmoothPurifyError
from smoothpurify.defenses import register_defense
from smoothpurify.defenses.common import (Clock, Curves, accuracy, batches, check_clean_set, descend,
                                          finetune, finish, mean_nll, resolve_options, steps_per_epoch,
                                          working_copy)
from smoothpurify.model import call_model, feature_stages
from smoothpurify.training import num_samples

DEFAULTS: dict[str, Any] = {
    "teacher": {"epochs": 10, "lr": 0.01},  # ``ft`` preset overrides for the teacher
    "epochs": 20,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "batch_size": 64,
    "betas": [500.0, 1000.0, 1000.0],       # shallow -> deep; the last len(layers) are used
    "p": 2.0,
    "layers": None,                         # module names; None = the last len(betas) feature stages
}


def attention_map(features: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """``sum_c |F_c|^p`` over channels, flattened over positions and L2-normalised per sample."""
    am = features.abs().pow(p).sum(1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + eps)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


class FeatureTap:
    """Collects the outputs of named modules on every forward pass (hooks removed by ``close``)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_m, _a, out):
            self.out[name] = out
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@register_defense("nad")
def neural_attention_distillation(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                                  options: dict[str, Any], *, seed: int = 0, device: str = "cpu", evaluate=None,
                                  eval_every: int | None = None, progress: bool = True,
                                  augment=None):  # unused: no fine-tuning through the core loop
    opts = resolve_options("nad", options, DEFAULTS)
    check_clean_set("nad", targets)
    clock = Clock()
    student, inputs, targets = working_copy(model, device, inputs, targets)
    betas = [float(b) for b in opts["betas"]]
    layers = list(opts["layers"] or feature_stages(student, len(betas)))
    if len(layers) > len(betas):
        raise SmoothPurifyError(f"defense nad: {len(layers)} layers but only {len(betas)} betas")
    betas = betas[-len(layers):]
    t0 = time.perf_counter()
    teacher_run = finetune(student, inputs, targets, likelihood, opts["teacher"], seed=seed, device=device,
                           progress=progress)
    clock.exclude(time.perf_counter() - t0 - teacher_run.record["seconds"]["total"])
    teacher = teacher_run.model.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_acc = accuracy(teacher, inputs, targets)
    clock.end_setup()

    s_tap, t_tap = FeatureTap(student, layers), FeatureTap(teacher, layers)
    opt = torch.optim.SGD(student.parameters(), lr=opts["lr"], momentum=opts["momentum"],
                          weight_decay=opts["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    curves = Curves(evaluate, eval_every, clock)
    n, epochs = num_samples(inputs), int(opts["epochs"])
    bar = tqdm(total=epochs * steps_per_epoch(n, opts["batch_size"]), desc="purify nad",
               disable=None if progress else True, leave=False)
    history = []
    try:
        for epoch in range(1, epochs + 1):
            student.train()
            total = 0.0
            for x, y in batches(inputs, targets, opts["batch_size"], gen):
                with torch.no_grad():
                    call_model(teacher, x)
                ce = mean_nll(student, likelihood, x, y)
                at = sum(b * attention_loss(s_tap.out[name], t_tap.out[name], opts["p"])
                         for b, name in zip(betas, layers))
                loss = ce + at
                total += descend(opt, loss, "nad", f"epoch {epoch}",
                                 f"lower lr (now {opts['lr']}) or the betas") * len(y)
                bar.update(1)
            history.append(total / n)
            curves(student, epoch, epochs, train_loss=history[-1])
    finally:
        bar.close()
        s_tap.close()
        t_tap.close()
    student.eval()
    return finish("nad", model, student.state_dict(), clock, opts, seed, evaluate, curves, val=(inputs, targets),
                  layers=layers, betas=betas, teacher_val_acc=teacher_acc, train_loss=history)
