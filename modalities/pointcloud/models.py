"""PointNet++ (SSG) and PointNet in plain PyTorch, written from the papers.

* Qi, Yi, Su & Guibas, "PointNet++: Deep Hierarchical Feature Learning on Point Sets in a Metric
  Space", NeurIPS 2017: farthest point sampling picks centroids, a ball query groups up to
  ``nsample`` neighbours within a radius, and a set abstraction applies a shared MLP (1x1
  convolutions with BatchNorm and ReLU) to each neighbour's local coordinates and features, then
  max-pools over the group. The classification network (single-scale grouping): SA(512, r 0.2, 32,
  [64, 64, 128]) -> SA(128, r 0.4, 64, [128, 128, 256]) -> SA(all, [256, 512, 1024]) -> FC 512, 256
  (dropout 0.5) -> classes.
* Qi, Su, Mo & Guibas, "PointNet: Deep Learning on Point Sets for 3D Classification and
  Segmentation", CVPR 2017: a shared per-point MLP, a global max pool and an MLP head (the input and
  feature transform nets are left out, as in the paper's vanilla variant).

Inputs are ``[B, 3, P]`` clouds in the unit cube (``geometry.py``); the nets map them to the unit
ball first. Between set abstractions a level is one tensor ``[B, 3 + C, S]``: centroid coordinates
then features, so that each stage outputs a single channels-first tensor (NAD's attention maps and
the core's hooks see ordinary feature maps). Every operation is batched and free of in-place writes
and data-dependent branches, so ``torch.func.vmap`` (per-sample Fisher gradients) runs the nets.
f-SFT's spectral parametrisation covers every 1x1 ``Conv2d`` / ``Conv1d`` and ``Linear`` here.
"""
from __future__ import annotations

import torch
from torch import nn

from smoothpurify.registry import Registry

MODELS = Registry("point-cloud model")


def farthest_point_sample(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    """Indices ``[B, npoint]``: start at point 0, then repeatedly the point farthest from those chosen."""
    b, n, _ = xyz.shape
    dist = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    farthest = torch.zeros(b, dtype=torch.long, device=xyz.device)
    chosen = []
    for _ in range(npoint):
        chosen.append(farthest)
        centre = xyz.gather(1, farthest.view(b, 1, 1).expand(b, 1, 3))
        dist = torch.minimum(dist, (xyz - centre).pow(2).sum(-1))
        farthest = dist.argmax(-1)
    return torch.stack(chosen, 1)


def ball_query(xyz: torch.Tensor, centres: torch.Tensor, radius: float, nsample: int) -> torch.Tensor:
    """Indices ``[B, S, nsample]``: the first ``nsample`` points (in index order) within ``radius`` of
    each centre, padded with the first one found (as the paper's grouping layer does). A centre that
    is itself a point of ``xyz`` always finds at least itself."""
    n = xyz.shape[1]
    d = (centres.unsqueeze(2) - xyz.unsqueeze(1)).pow(2).sum(-1)                 # [B, S, N]
    order = torch.arange(n, device=xyz.device).expand_as(d)
    key = torch.where(d <= radius * radius, order, torch.full_like(order, n))
    k = min(nsample, n)
    key = torch.topk(key, k, dim=-1, largest=False, sorted=True).values
    key = torch.where(key == n, key[..., :1], key)
    if k < nsample:  # fewer points than the group size: repeat the first index
        key = torch.cat([key, key[..., :1].expand(*key.shape[:2], nsample - k)], -1)
    return key


def gather_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``points [B, N, C]`` at ``idx [B, ...]`` -> ``[B, ..., C]``."""
    b, c = points.shape[0], points.shape[-1]
    flat = idx.reshape(b, -1)
    return points.gather(1, flat.unsqueeze(-1).expand(b, flat.shape[1], c)).reshape(*idx.shape, c)


def shared_mlp(channels: list[int], dim: int = 2) -> nn.Sequential:
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dim == 2 else (nn.Conv1d, nn.BatchNorm1d)
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, 1, bias=False), norm(c_out), nn.ReLU()]
    return nn.Sequential(*layers)


class SetAbstraction(nn.Module):
    """One set-abstraction level: ``[B, 3 + C, N]`` -> ``[B, 3 + C', npoint]`` (``group_all``: one
    group holding every point, centred at the origin; output ``[B, 3 + C', 1]``)."""

    def __init__(self, npoint: int | None, radius: float, nsample: int, in_features: int, mlp: list[int]):
        super().__init__()
        self.npoint, self.radius, self.nsample = npoint, float(radius), int(nsample)
        self.mlp = shared_mlp([3 + in_features, *mlp])

    def forward(self, level: torch.Tensor) -> torch.Tensor:
        xyz = level[:, :3].transpose(1, 2)                                        # [B, N, 3]
        feats = level[:, 3:].transpose(1, 2) if level.shape[1] > 3 else None      # [B, N, C]
        if self.npoint is None:
            centres = torch.zeros_like(xyz[:, :1])
            grouped = xyz.unsqueeze(1)                                            # [B, 1, N, 3]
            grouped_feats = None if feats is None else feats.unsqueeze(1)
        else:
            # Indices depend on coordinates only, never on weights: no gradient flows through them.
            idx = farthest_point_sample(xyz.detach(), self.npoint)
            centres = gather_points(xyz, idx)                                     # [B, S, 3]
            group = ball_query(xyz.detach(), centres.detach(), self.radius, self.nsample)
            grouped = gather_points(xyz, group) - centres.unsqueeze(2)            # local coordinates
            grouped_feats = None if feats is None else gather_points(feats, group)
        if grouped_feats is not None:
            grouped = torch.cat([grouped, grouped_feats], -1)
        out = self.mlp(grouped.permute(0, 3, 1, 2)).amax(-1)                      # [B, C', S]
        return torch.cat([centres.transpose(1, 2), out], 1)


def head(widths: list[int], num_classes: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        # No BatchNorm here (the paper's head has it): a training set whose size leaves a last batch of
        # one or two clouds made BatchNorm1d's statistics degenerate and training collapsed mid-run.
        layers += [nn.Linear(c_in, c_out), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))


class PointNet2SSG(nn.Module):
    """PointNet++ classification with single-scale grouping (Qi et al. 2017; see the module docstring).

    ``width`` scales every channel count (1.0: the paper's); ``npoints`` are the two sampled levels'
    sizes, by default half and an eighth of the input's points (the paper's 512 and 128 of 1,024).
    """

    def __init__(self, num_classes: int, num_points: int = 1024, width: float = 1.0,
                 npoints: tuple[int, int] | None = None, nsamples: tuple[int, int] = (32, 64),
                 radii: tuple[float, float] = (0.2, 0.4), dropout: float = 0.5):
        super().__init__()
        w = lambda c: max(8, int(round(c * width)))  # noqa: E731 - local shorthand
        s1, s2 = npoints or (max(1, num_points // 2), max(1, num_points // 8))
        self.sa1 = SetAbstraction(s1, radii[0], nsamples[0], 0, [w(64), w(64), w(128)])
        self.sa2 = SetAbstraction(s2, radii[1], nsamples[1], w(128), [w(128), w(128), w(256)])
        self.sa3 = SetAbstraction(None, 0.0, 0, w(256), [w(256), w(512), w(1024)])
        self.head = head([w(1024), w(512), w(256)], num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = self.sa3(self.sa2(self.sa1(2 * x - 1)))
        return self.head(level[:, 3:, 0])


class PointNet(nn.Module):
    """Vanilla PointNet (Qi et al., CVPR 2017, without T-nets): shared MLP, max pool, MLP head."""

    def __init__(self, num_classes: int, num_points: int = 1024, width: float = 1.0, dropout: float = 0.3):
        super().__init__()
        w = lambda c: max(8, int(round(c * width)))  # noqa: E731
        self.features = shared_mlp([3, w(64), w(64), w(64), w(128), w(1024)], dim=1)
        self.head = head([w(1024), w(512), w(256)], num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(2 * x - 1).amax(-1))


@MODELS.register("pointnet2_ssg")
def pointnet2_ssg(num_classes: int, num_points: int = 1024) -> nn.Module:
    """PointNet++ SSG (Qi et al. 2017), the SFT paper's Table 4 model."""
    return PointNet2SSG(num_classes, num_points)


@MODELS.register("pointnet2_ssg_small")
def pointnet2_ssg_small(num_classes: int, num_points: int = 1024) -> nn.Module:
    """The same architecture at a quarter of the channels, smaller groups and radii scaled to the
    point density: the CPU smoke model."""
    # Radii grow as the clouds thin out (point spacing ~ 1 / sqrt(P)): at 256 points the paper's 0.2
    # ball around a centroid holds one or two neighbours and the local features degenerate.
    grow = max(1.0, (1024 / num_points) ** 0.5)
    return PointNet2SSG(num_classes, num_points, width=0.25, npoints=(max(1, num_points // 4), max(1, num_points // 16)),
                        nsamples=(16, 16), radii=(0.2 * grow, 0.4 * grow), dropout=0.3)


@MODELS.register("pointnet")
def pointnet(num_classes: int, num_points: int = 1024) -> nn.Module:
    """PointNet (Qi et al. 2017, CVPR) at a quarter of the channels: the small option."""
    return PointNet(num_classes, num_points, width=0.25)
