"""Patch-stamping attacks: the trigger replaces pixels under a mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from modalities.contract import Attack


class StampAttack(Attack):
    """x' = (1 - m) * x + m * p with a fixed mask m and pattern p (both ``[C, H, W]``)."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        m, p = self.trigger["mask"], self.trigger["pattern"]
        return x * (1 - m) + m * p


class BadNets(StampAttack):
    """BadNets (Gu et al. 2017): a 3x3 black/white checkerboard in the bottom-right corner.

    The patch sits ``margin`` pixels (default 1) away from the border.
    """

    name = "badnets"

    def make_trigger(self) -> dict[str, torch.Tensor]:
        c, h, w = self.input_shape
        size, margin = int(self.options.get("size", 3)), int(self.options.get("margin", 1))
        mask, pattern = torch.zeros(c, h, w), torch.zeros(c, h, w)
        r0, c0 = h - margin - size, w - margin - size
        checker = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 == 0
        mask[:, r0:r0 + size, c0:c0 + size] = 1.0
        pattern[:, r0:r0 + size, c0:c0 + size] = checker.float()
        return {"mask": mask, "pattern": pattern}


class Trojan(StampAttack):
    """Trojan watermark (Liu et al. 2018, TrojanNN), static form.

    TrojanNN optimises a watermark-shaped trigger on a pre-trained network; here the watermark is
    a fixed, seeded pattern inside a square-ring mask covering about a quarter of the image side in
    the bottom-right corner, as the static "Troj" trigger used by the papers' benchmarks.
    The neuron-optimised variant belongs to the full attack suite.
    """

    name = "trojan"

    def make_trigger(self) -> dict[str, torch.Tensor]:
        c, h, w = self.input_shape
        side = max(5, int(round(self.options.get("fraction", 0.25) * min(h, w))))
        r0, c0 = h - 1 - side, w - 1 - side
        ring = torch.ones(side, side)
        ring[2:-2, 2:-2] = 0.0  # a frame two pixels thick, like a watermark outline
        coarse = torch.rand(1, c, 3, 3, generator=self.generator)
        texture = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=True)[0]
        mask, pattern = torch.zeros(c, h, w), torch.zeros(c, h, w)
        mask[:, r0:r0 + side, c0:c0 + side] = ring
        pattern[:, r0:r0 + side, c0:c0 + side] = (texture > 0.5).float() * ring
        return {"mask": mask, "pattern": pattern}
