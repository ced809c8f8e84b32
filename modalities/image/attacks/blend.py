"""Blending attacks: the trigger is mixed into the whole image."""
from __future__ import annotations

import math

import torch

from modalities.contract import Attack


class Blend(Attack):
    """Blended injection (Chen et al. 2017): x' = (1 - alpha) x + alpha * k, k a fixed uniform-noise image."""

    name = "blend"

    def make_trigger(self) -> dict[str, torch.Tensor]:
        return {"pattern": torch.rand(self.input_shape, generator=self.generator)}

    @property
    def alpha(self) -> float:
        return float(self.options.get("alpha", 0.2))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * x + self.alpha * self.trigger["pattern"]


class SIG(Blend):
    """SIG (Barni et al. 2019): clean-label; a horizontal sinusoid v(j) = sin(2 pi j f / W) is blended in.

    Only target-class training samples are poisoned and their labels stay unchanged; the
    model learns to associate the signal with the target class. ``alpha`` 0.2, ``frequency`` 6.
    """

    name = "sig"
    clean_label = True

    def make_trigger(self) -> dict[str, torch.Tensor]:
        c, h, w = self.input_shape
        f = float(self.options.get("frequency", 6))
        cols = torch.arange(w, dtype=torch.float32)
        wave = 0.5 * (1 + torch.sin(2 * math.pi * cols * f / w))  # in [0, 1], like an image
        return {"pattern": wave.expand(c, h, w).contiguous()}
