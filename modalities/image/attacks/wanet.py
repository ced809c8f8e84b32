"""WaNet: an imperceptible warping of the image is the trigger."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from modalities.contract import Attack


class WaNet(Attack):
    """WaNet (Nguyen & Tran, ICLR 2021, "WaNet - Imperceptible Warping-based Backdoor Attack").

    A fixed random warping field: a ``k x k`` grid of uniform offsets in [-1, 1], normalised by
    its mean absolute value, upsampled (bicubic) to the image size; the sampling grid is
    ``identity + s * field / H`` (clamped to [-1, 1]) and poisoned images are
    ``grid_sample(x, grid)``. Paper values ``k`` 4, ``s`` 0.5 (defaults): a sub-pixel warp on
    average at 28x28, learned in the smoke profile's 4 epochs on 20k images (ASR ~99%), but not
    with fewer steps (a 4,000-image run stays at ~7%; ``s`` 1.0 then reaches ~90%).

    Noise mode: besides the poisoned share, ``cross_ratio`` (2) times as many other training
    samples are warped with the field plus a per-pixel random offset in [-1, 1] / H and keep
    their true label, so the model learns the exact warp, not "any warp". The paper redraws
    these every batch; here they are drawn once from the attack's seed (the poisoned set is fixed
    before training). ``self.noise_mask`` marks them after :meth:`poison_training_set`.
    """

    name = "wanet"

    def make_trigger(self) -> dict[str, torch.Tensor]:
        _, h, w = self.input_shape
        k = int(self.options.get("k", 4))
        ins = torch.rand(1, 2, k, k, generator=self.generator) * 2 - 1
        ins = ins / ins.abs().mean()
        field = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True)
        return {"field": field[0]}  # [2, H, W]: (x, y) offsets before scaling

    @property
    def strength(self) -> float:
        return float(self.options.get("s", 0.5))

    def identity_grid(self) -> torch.Tensor:
        _, h, w = self.input_shape
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        return torch.stack((cols, rows), dim=-1)  # grid_sample wants (x, y) last

    def grid(self) -> torch.Tensor:
        h = self.input_shape[1]
        # The paper scales by the height for both axes; kept for fidelity.
        return (self.identity_grid() + self.strength * self.trigger["field"].permute(1, 2, 0) / h).clamp(-1, 1)

    def warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if grid.dim() == 3:
            grid = grid.unsqueeze(0).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid.to(x.device, x.dtype), mode="bilinear", padding_mode="border",
                             align_corners=True).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.warp(x, self.grid())

    def noise_warp(self, x: torch.Tensor) -> torch.Tensor:
        """The noise mode's warp: the trigger grid jittered per pixel and per sample."""
        _, h, w = self.input_shape
        jitter = (torch.rand(len(x), h, w, 2, generator=self.generator) * 2 - 1) / h
        return self.warp(x, (self.grid().unsqueeze(0) + jitter).clamp(-1, 1))

    def poison_training_set(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096):
        x, y, mask = super().poison_training_set(x, y, batch)
        n_noise = int(round(float(self.options.get("cross_ratio", 2)) * int(mask.sum())))
        pool = torch.nonzero(~mask).flatten()
        rng = torch.Generator().manual_seed(self.seed + 1)
        chosen = pool[torch.randperm(len(pool), generator=rng)[:n_noise]].sort().values
        for chunk in chosen.split(batch):
            x[chunk] = self.noise_warp(x[chunk])
        self.noise_mask = torch.zeros(len(y), dtype=torch.bool)
        self.noise_mask[chosen] = True
        return x, y, mask
