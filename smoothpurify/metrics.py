"""Backdoor metrics as plain functions of predictions (any modality with class predictions), and the
clean accuracy of a model on the defender's validation set."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from smoothpurify.model import call_model
from smoothpurify.training import index_inputs, num_samples


@dataclass(frozen=True)
class Metric:
    """A reported number that knows its direction, so a report can say which result is best for
    any modality (ACC and mAP up, ASR down, BLEU up) without knowing the modality."""

    key: str                  # the key in evaluation records, e.g. "asr"
    label: str                # the column header, e.g. "ASR %"
    higher_is_better: bool
    percent: bool = True      # stored as a fraction, shown in percent
    # What the number says, so a verdict can read any modality's metrics: "attack" (the backdoor
    # works: ASR), "clean" (utility on clean inputs: ACC, mAP, BLEU) or "other" (e.g. RA).
    role: str = "other"

    def __post_init__(self) -> None:
        if self.role not in ("attack", "clean", "other"):
            raise ValueError(f"metric {self.key}: role must be attack, clean or other, got {self.role!r}")

    def better(self, a: float, b: float) -> bool:
        """Is ``a`` strictly better than ``b``?"""
        return a > b if self.higher_is_better else a < b


# The backdoor metrics of every classifier-like modality.
ACC = Metric("acc", "ACC %", higher_is_better=True, role="clean")
ASR = Metric("asr", "ASR %", higher_is_better=False, role="attack")
RA = Metric("ra", "RA %", higher_is_better=True)
BACKDOOR_METRICS = (ASR, ACC, RA)  # table order


def metric_with_role(metrics: tuple[Metric, ...], role: str) -> Metric | None:
    """The first metric declaring ``role``; without one, the first lower-is-better metric stands for
    "attack" and the first higher-is-better one for "clean"."""
    declared = next((m for m in metrics if m.role == role), None)
    if declared is not None or role == "other":
        return declared
    return next((m for m in metrics if m.higher_is_better == (role == "clean")), None)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """ACC: fraction of clean inputs classified correctly."""
    return float((pred == labels).float().mean()) if labels.numel() else float("nan")


def attack_success_rate(pred: torch.Tensor, attack_targets: torch.Tensor) -> float:
    """ASR: fraction of poisoned inputs classified as the attacker's target.

    The poisoned test set must already exclude inputs whose true label equals their target
    (all2one) — that is the attack's job when it builds the set.
    """
    return accuracy(pred, attack_targets)


def robust_accuracy(pred: torch.Tensor, true_labels: torch.Tensor) -> float:
    """RA (a.k.a. label correction rate): poisoned inputs classified as their true label."""
    return accuracy(pred, true_labels)


def backdoor_metrics(clean_pred, clean_labels, poison_pred, poison_true, poison_target) -> dict[str, float]:
    return {
        "acc": accuracy(clean_pred, clean_labels),
        "asr": attack_success_rate(poison_pred, poison_target),
        "ra": robust_accuracy(poison_pred, poison_true),
    }


def correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample correctness in [0, 1] for the likelihoods of the core: class indices (argmax,
    averaged over tokens when outputs are ``[B, T, C]``) or multi-label 0/1 targets (threshold 0)."""
    if targets.is_floating_point() and targets.shape == outputs.shape:
        hits = ((outputs > 0).to(targets.dtype) == targets).float()
    else:
        hits = (outputs.argmax(-1) == targets).float()
    return hits.reshape(len(hits), -1).mean(1)


@torch.no_grad()
def model_accuracy(model: nn.Module, inputs: Any, targets: torch.Tensor, batch_size: int = 512) -> float:
    """Clean accuracy of ``model`` (eval mode, restored after) on ``inputs, targets``."""
    was_training = model.training
    model.eval()
    total = 0.0
    for idx in torch.arange(num_samples(inputs), device=targets.device).split(batch_size):
        total += float(correct(call_model(model, index_inputs(inputs, idx)), targets[idx]).sum())
    model.train(was_training)
    return total / len(targets)
