"""The trigger families a point-cloud purification reverse-engineers and unlearns (``unlearn_share``,
:mod:`smoothpurify.unlearn`): the two shapes a point-cloud backdoor takes in the literature, each
within a budget the defender fixes without knowing the attack.

* :class:`ClusterInsertion`: ``k`` points (an eighth of the cloud) inserted as one cluster, its centre
  anywhere in the cube and every point within ``radius`` (0.1 per axis, the presets' overlay's largest
  cluster radius) of it; they replace the cloud's last ``k`` points (orders are random, so these are
  random points). The insertion triggers (PointBA-I's ball, 3DPC-BA's cluster) are of this shape.
* :class:`Tilt`: a rotation of the whole cloud about the cube's centre, at most ``max_degrees`` (60)
  about each axis; the orientation triggers (PointBA-O, PointCBA) are of this shape.

Free parameters are unconstrained reals; ``sigmoid`` / ``tanh`` keep the trigger within its budget, so
the search (``max mean log p(t | trigger(x))``) needs no size term.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from modalities.pointcloud.attacks import insert_points, rotate


def rotation(omega: torch.Tensor) -> torch.Tensor:
    """The rotation matrix ``exp([omega]_x)`` of the axis-angle vector ``omega`` (differentiable)."""
    zero = omega.new_zeros(())
    skew = torch.stack([torch.stack([zero, -omega[2], omega[1]]), torch.stack([omega[2], zero, -omega[0]]),
                        torch.stack([-omega[1], omega[0], zero])])
    return torch.linalg.matrix_exp(skew)


class ClusterInsertion:
    def __init__(self, share: float = 0.125, radius: float = 0.1):
        self.share, self.radius = share, radius

    def points(self, example: torch.Tensor) -> int:
        return max(1, round(self.share * example.shape[-1]))

    def init(self, example: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        k = self.points(example)
        return {"centre": torch.randn(3, generator=generator), "offsets": 0.1 * torch.randn(3, k, generator=generator)}

    def cluster(self, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inserted points ``[3, k]`` in cube units."""
        return (torch.sigmoid(theta["centre"])[:, None] + self.radius * torch.tanh(theta["offsets"])).clamp(0, 1)

    def apply(self, x: torch.Tensor, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return insert_points(x, self.cluster(theta))

    def describe(self, theta: dict[str, torch.Tensor]) -> dict[str, Any]:
        points = self.cluster(theta).detach().cpu()
        return {"kind": "cluster", "points": points.shape[1],
                "centre": [round(float(v), 3) for v in points.mean(dim=1)]}


class Tilt:
    def __init__(self, max_degrees: float = 60.0):
        self.max_angle = math.radians(max_degrees)

    def init(self, example: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"angles": torch.rand(3, generator=generator) * 2 - 1}

    def grid(self, example: torch.Tensor, steps: int = 5) -> list[dict[str, torch.Tensor]]:
        """``steps``^3 axis-angle vectors evenly over the budget (each component at most 0.8 of it)."""
        values = torch.linspace(-0.8, 0.8, steps)
        return [{"angles": torch.atanh(torch.stack([a, b, c]))} for a in values for b in values for c in values]

    def matrix(self, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return rotation(self.max_angle * torch.tanh(theta["angles"]))

    def apply(self, x: torch.Tensor, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return rotate(x, self.matrix(theta))

    def describe(self, theta: dict[str, torch.Tensor]) -> dict[str, Any]:
        omega = (self.max_angle * torch.tanh(theta["angles"])).detach().cpu()
        return {"kind": "rotation", "axis_angle_degrees": [round(math.degrees(float(v)), 1) for v in omega],
                "degrees": round(math.degrees(float(omega.norm())), 1)}


def unlearn_families() -> dict[str, Any]:
    return {"cluster": ClusterInsertion(), "tilt": Tilt()}
