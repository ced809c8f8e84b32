"""The per-sample scan family (smoothpurify.per_sample): DDN against the closed form of a linear model."""
from __future__ import annotations

import math

import torch
from torch import nn

from smoothpurify.per_sample import PerSample, min_norms
from smoothpurify.scan import ScanSettings


class TwoClassLinear(nn.Module):
    """Logits ``[0, w.x + b]``: class 1 exactly where ``w.x + b > 0``."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


def _below_the_plane(n: int = 16):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(20, generator=gen)
    x = torch.randn(64, 20, generator=gen) * 0.3
    return TwoClassLinear(w, -1.0), w, x[(x @ w - 1.0) < 0][:n]


def test_min_norms_is_the_distance_to_the_decision_boundary():
    model, w, x = _below_the_plane()
    exact = -(x @ w - 1.0) / w.norm()                       # distance to the hyperplane w.x + b = 0
    found, delta = min_norms(model, x, target=1)
    assert torch.isfinite(found).all()
    assert (found >= exact * (1 - 1e-4)).all()              # never below the true minimum
    assert (found <= exact * 1.05 + 1e-3).all()             # and within 5 % of it
    assert torch.allclose(delta.norm(dim=1), found)         # the perturbation returned is that one ...
    assert (model(x + delta).argmax(1) == 1).all()          # ... and it reaches the target


def test_an_unreachable_target_is_inf():
    model = TwoClassLinear(torch.zeros(5), -1.0)            # class 1 never wins
    norms, delta = min_norms(model, torch.zeros(4, 5), target=1, steps=10)
    assert norms.tolist() == [math.inf] * 4 and not delta.any()


def test_the_family_s_size_is_the_median_distance_of_other_classes_inputs():
    model, w, x = _below_the_plane(40)
    targets = torch.zeros(len(x), dtype=torch.long)         # every input is of class 0
    result = PerSample(inputs=16).scan(model, x, targets, 2, ScanSettings(per_sample_steps=100), seed=3, progress=False)
    gen = torch.Generator().manual_seed(3)
    torch.randperm(0, generator=gen)                        # class 0's draw: no input outside it
    idx = torch.randperm(len(x), generator=gen)[:16]
    exact = (-(x[idx] @ w - 1.0) / w.norm()).median()
    assert result.triggers[0].size == math.inf              # no input outside class 0
    assert result.triggers[0].picture["trigger"].shape == x[0].shape   # still something to draw
    assert abs(result.triggers[1].size - float(exact)) <= 0.05 * float(exact)
    assert result.triggers[1].success == 1.0


def test_image_scans_search_the_per_sample_family():
    from modalities.contract import get_modality
    from pipeline.scan import trigger_families

    assert set(trigger_families(get_modality("image"), torch.zeros(1, 8, 8))) == {"mask", "additive", "margin", "per-sample"}
    assert "per-sample" in trigger_families(get_modality("image"), torch.zeros(5))
