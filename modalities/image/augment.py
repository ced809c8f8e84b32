"""Training-time augmentation of the image modality, also used during purification.

Random shifts by up to ``pad`` pixels, drawn per sample (a padded copy cropped at a random
offset, the "random crop" of CIFAR training). Horizontal flips are off by default: they move a
corner trigger patch to the other corner, so a flipped poisoned image would teach the model a
second trigger position during training, and during purification they would not show the
defender anything the model was trained on.
"""
from __future__ import annotations

import torch


def random_shift(x: torch.Tensor, gen: torch.Generator, pad: int = 2, flip: bool = False) -> torch.Tensor:
    """Each image of ``x`` (N x C x H x W) shifted by its own random offset in ``[-pad, pad]``^2
    (edges replicated), and mirrored left-right with probability 1/2 when ``flip``."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, n), generator=gen)).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    if flip:
        mirror = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    return out
