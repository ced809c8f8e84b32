"""What "one cloud laid over another" means for the purification presets' overlay consistency.

The image presets blend another input of the batch into some inputs and ask the tuned model for the
clean answer (``smoothpurify.objective``, ``overlay_max``). A cloud's points have no order, so
averaging the i-th points of two clouds is no overlay. The point-cloud counterpart inserts a piece of
the partner cloud instead: a compact cluster of points, the shape every insertion trigger of this
modality has (PointBA-I's ball, 3DPC-BA's cluster), but cut from a real surface, at a random size and
place. The weight says how much of the cloud the cluster takes: ``round(w * P)`` of its ``P`` points.

The sizes were fixed before any purification ran with them: radius ``U(0.02, 0.1)`` (cube units; the
objects have radius 0.45) and a centre uniform in ``[0.1, 0.9]^3`` (anywhere in the object's box,
corners included).
"""
from __future__ import annotations

import torch

CLUSTER_RADIUS = (0.02, 0.1)
CLUSTER_REGION = (0.1, 0.9)


def _uniform(lo: float, hi: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=generator)


def insert_clusters(inputs: torch.Tensor, partners: torch.Tensor, weights: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """``inputs [N, 3, P]`` with, in each cloud whose weight ``w`` is > 0, ``k = round(w P)`` of its points
    (any but the first, which farthest point sampling starts from) replaced by a cluster: the ``k``
    points of its partner cloud nearest to one of them, centred, scaled to a radius ``r ~
    U(CLUSTER_RADIUS)`` and moved to a centre uniform in ``CLUSTER_REGION^3``, clamped to the cube.
    A new tensor; clouds of weight 0 are copied unchanged."""
    out = inputs.clone()
    p = inputs.shape[2]
    for i in torch.nonzero(weights > 0).flatten().tolist():
        k = min(p - 1, max(1, round(float(weights[i]) * p)))
        partner = partners[i]
        seed = partner[:, int(torch.randint(p, (1,), generator=generator))]
        nearest = (partner - seed[:, None]).norm(dim=0).topk(k, largest=False).indices
        patch = partner[:, nearest]
        patch = patch - patch.mean(dim=1, keepdim=True)
        size = patch.norm(dim=0).max().clamp_min(1e-6)
        radius = _uniform(*CLUSTER_RADIUS, (1,), generator).to(inputs)
        centre = _uniform(*CLUSTER_REGION, (3, 1), generator).to(inputs)
        where = (torch.randperm(p - 1, generator=generator)[:k] + 1).to(inputs.device)
        out[i, :, where] = (centre + patch * (radius / size)).clamp(0, 1)
    return out
