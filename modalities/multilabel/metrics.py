"""mAP and ASR of a multi-label model."""
from __future__ import annotations

import torch

from smoothpurify.metrics import ASR, Metric

MAP = Metric("map", "mAP %", higher_is_better=True, role="clean")
METRICS = (ASR, MAP)  # table order, as the image modality's (ASR first)


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro mAP: the mean over categories of average precision ``sum_n (R_n - R_{n-1}) P_n`` over
    the distinct score thresholds (tied scores form one threshold). Categories without a positive
    image are left out. Equal to torchmetrics' ``MultilabelAveragePrecision(average="macro")`` and
    scikit-learn's ``average_precision_score`` (tests/test_multilabel_data.py checks both); written
    here because importing torchmetrics imports the CUDA-built torchvision, which fails on CPU torch."""
    aps = []
    for k in range(labels.shape[1]):
        y = labels[:, k] > 0.5
        if not bool(y.any()):
            continue
        s = scores[:, k].double()
        order = torch.argsort(s, descending=True, stable=True)
        s, y = s[order], y[order].double()
        tp, fp = torch.cumsum(y, 0), torch.cumsum(1 - y, 0)
        last = torch.ones_like(s, dtype=torch.bool)  # the last index of each run of tied scores
        last[:-1] = s[1:] != s[:-1]
        tp, fp = tp[last], fp[last]
        precision, recall = tp / (tp + fp), tp / tp[-1]
        prev = torch.cat([recall.new_zeros(1), recall[:-1]])
        aps.append(float(((recall - prev) * precision).sum()))
    return sum(aps) / len(aps) if aps else float("nan")
