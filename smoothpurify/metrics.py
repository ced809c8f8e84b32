"""Backdoor metrics as plain functions of predictions (any modality with class predictions)."""
from __future__ import annotations

import torch


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
