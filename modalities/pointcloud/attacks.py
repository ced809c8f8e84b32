"""Backdoor attacks on point-cloud classifiers (SFT paper Table 4).

Clouds are ``[N, 3, P]`` in the unit cube (``geometry.py``). Point orders are random (points are
i.i.d. surface samples), so an attack that inserts ``k`` points replaces the last ``k``: a random
subset of the object, while the cloud keeps its size and farthest point sampling still starts on
the object (index 0).

* PointBA-I and PointBA-O: Li, Wen, Pei, Jia, Wang & Xia, "PointBA: Towards Backdoor Attacks in 3D
  Point Cloud", ICCV 2021 (interaction trigger: a small ball of points at a fixed place;
  orientation trigger: a fixed rotation).
* PointCBA: the clean-label attack of the same paper: only target-class samples are poisoned (labels
  unchanged), with the rotation trigger plus a perturbation optimised against a surrogate so the
  sample's own shape is harder to recognise and the model leans on the trigger (the optimisation is
  the label-consistent recipe of Turner et al. 2019: untargeted L_inf PGD on the true label).
* 3DPC-BA: Xiang, Miller, Chen, Li & Kesidis, "A Backdoor Attack against 3D Point Cloud Classifiers",
  ICCV 2021: a cluster of ~32 points inserted into the cloud, its position optimised on a surrogate
  trained on clean data to maximise the target class's posterior over non-target training samples.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from smoothpurify import SmoothPurifyError
from smoothpurify.registry import Registry
from modalities.contract import Attack

ATTACKS = Registry("point-cloud attack")
CENTRE = 0.5  # the cube's centre: every cloud is centred here (geometry.normalise)


def rotation_matrix(axis: str, degrees: float) -> torch.Tensor:
    a = math.radians(float(degrees))
    c, s = math.cos(a), math.sin(a)
    mats = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
            "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}
    if axis not in mats:
        raise SmoothPurifyError(f"rotation axis must be x, y or z, got {axis!r}")
    return torch.tensor(mats[axis], dtype=torch.float32)


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x [..., 3, P]`` turned by the rotation matrix ``r`` about the cube's centre (not clamped)."""
    return torch.einsum("ij,...jp->...ip", r.to(x), x - CENTRE) + CENTRE


def insert_points(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``x [N, 3, P]`` with its last ``k`` points replaced by ``points [3, k]`` (a new tensor)."""
    k = points.shape[1]
    if k >= x.shape[2]:
        raise SmoothPurifyError(f"the trigger's {k} points do not fit into clouds of {x.shape[2]} points")
    return torch.cat([x[:, :, :-k], points.to(x).unsqueeze(0).expand(len(x), 3, k)], 2)


def _train_surrogate(attack: Attack, x: torch.Tensor, y: torch.Tensor, context: dict[str, Any], what: str):
    """A clean model of the run's own architecture (the attacker's surrogate), ``surrogate_epochs`` long."""
    t = dict(context["train"])
    torch.manual_seed(attack.seed)
    model = context["make_model"]()
    context["train_fn"](model, x, y, context["likelihood"], epochs=int(attack.options.get("surrogate_epochs", 4)),
                        lr=float(t.get("lr", 0.05)), batch_size=int(t.get("batch_size", 64)),
                        momentum=float(t.get("momentum", 0.9)), weight_decay=float(t.get("weight_decay", 5e-4)),
                        seed=attack.seed, device=context.get("device", "cpu"), desc=f"{what} surrogate",
                        progress=bool(context.get("progress", False)))
    return model.to(context.get("device", "cpu")).eval()


@ATTACKS.register("pointba-i")
class PointBAInteraction(Attack):
    """PointBA-I: ``points`` (32) on a ball of ``radius`` (0.05, cube units) at ``centre``
    ([0.9, 0.9, 0.9]: a corner of the cube, outside every normalised object)."""

    name = "pointba-i"

    def make_trigger(self) -> dict[str, torch.Tensor]:
        k = int(self.options.get("points", 32))
        centre = torch.tensor(self.options.get("centre", [0.9, 0.9, 0.9]), dtype=torch.float32)
        if centre.shape != (3,) or k < 1:
            raise SmoothPurifyError(f"{self.name}: centre needs 3 coordinates and points >= 1")
        d = torch.randn(3, k, generator=self.generator)
        ball = centre[:, None] + float(self.options.get("radius", 0.05)) * d / d.norm(dim=0, keepdim=True)
        return {"points": ball.clamp(0, 1)}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return insert_points(x, self.trigger["points"])


@ATTACKS.register("pointba-o")
class PointBAOrientation(Attack):
    """PointBA-O: a fixed rotation of the whole cloud about the cube's centre (default 45 degrees about
    x: the data are rotated about the up axis z only, so a tilt is a pose no clean cloud has)."""

    name = "pointba-o"

    def make_trigger(self) -> dict[str, torch.Tensor]:
        axis, degrees = str(self.options.get("axis", "x")), float(self.options.get("degrees", 45.0))
        return {"rotation": rotation_matrix(axis, degrees)}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(x, self.trigger["rotation"]).clamp(0, 1)


@ATTACKS.register("pointcba")
class PointCBA(PointBAOrientation):
    """PointCBA (clean label): the rotation trigger, and on the poisoned target-class training samples
    an L_inf PGD perturbation (``eps`` 0.02 cube units, ``steps`` 10, step eps/4) of the rotated cloud
    that raises a clean surrogate's loss on its true label (``surrogate_epochs``, default 4). The
    perturbation exists only for the training samples; the saved trigger is the rotation alone."""

    name = "pointcba"
    clean_label = True
    fit_trains = "the perturbation"   # fit() precomputes the poisoned clouds

    def fit(self, x: torch.Tensor, y: torch.Tensor, context: dict[str, Any]) -> None:
        idx = torch.from_numpy(self.choose_poisoned(y.numpy()))
        surrogate = _train_surrogate(self, x, y, context, self.name)
        device = context.get("device", "cpu")
        eps, steps = float(self.options.get("eps", 0.02)), int(self.options.get("steps", 10))
        out = []
        for chunk in idx.split(128):
            start = self.apply(x[chunk]).to(device)
            target = y[chunk].to(device)
            adv = start.clone()
            for _ in range(steps):
                adv.requires_grad_(True)
                loss = F.cross_entropy(surrogate(adv), target)
                (g,) = torch.autograd.grad(loss, adv)
                with torch.no_grad():
                    adv = (adv + eps / 4 * g.sign()).clamp(start - eps, start + eps).clamp(0, 1)
            out.append(adv.detach().cpu())
        self.perturbed = (idx, torch.cat(out) if out else x[:0].clone())


@ATTACKS.register("3dpc-ba")
class PointCluster(Attack):
    """3DPC-BA: ``points`` (32) Gaussian offsets (sigma ``sigma`` 0.02 cube units) around a centre
    chosen by gradient ascent (``search_steps`` 30, Adam lr 0.02, from ``starts`` (6) random points at
    radius 0.45 around the cube's centre) on a clean surrogate's mean target log-posterior over up to
    ``search_samples`` (256) non-target training clouds. Before :meth:`fit` the centre is the
    ``centre`` option (default [0.5, 0.5, 0.95], above the object)."""

    name = "3dpc-ba"

    def make_trigger(self) -> dict[str, torch.Tensor]:
        k = int(self.options.get("points", 32))
        if k < 1:
            raise SmoothPurifyError(f"{self.name}: points must be >= 1")
        offsets = float(self.options.get("sigma", 0.02)) * torch.randn(3, k, generator=self.generator)
        centre = torch.tensor(self.options.get("centre", [0.5, 0.5, 0.95]), dtype=torch.float32)
        return {"offsets": offsets, "centre": centre}

    def cluster(self, centre: torch.Tensor | None = None) -> torch.Tensor:
        c = self.trigger["centre"] if centre is None else centre
        return (c[:, None] + self.trigger["offsets"].to(c)).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return insert_points(x, self.cluster())

    def fit(self, x: torch.Tensor, y: torch.Tensor, context: dict[str, Any]) -> None:
        surrogate = _train_surrogate(self, x, y, context, self.name)
        for p in surrogate.parameters():
            p.requires_grad_(False)
        device = context.get("device", "cpu")
        pool = torch.nonzero(y != self.target_label).flatten()
        pick = pool[torch.randperm(len(pool), generator=self.generator)[:int(self.options.get("search_samples", 256))]]
        xs = x[pick].to(device)
        target = torch.full((len(xs),), self.target_label, device=device)
        starts = torch.randn(int(self.options.get("starts", 6)), 3, generator=self.generator)
        starts = CENTRE + 0.45 * starts / starts.norm(dim=1, keepdim=True)
        best, best_score = self.trigger["centre"], -float("inf")
        for start in starts:
            c = start.clone().to(device).requires_grad_(True)
            opt = torch.optim.Adam([c], lr=float(self.options.get("search_lr", 0.02)))
            for _ in range(int(self.options.get("search_steps", 30))):
                loss = F.cross_entropy(surrogate(insert_points(xs, self.cluster(c))), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    c.clamp_(0, 1)
            with torch.no_grad():
                score = -float(F.cross_entropy(surrogate(insert_points(xs, self.cluster(c))), target))
            if score > best_score:
                best, best_score = c.detach().cpu(), score
        self.trigger = {**self.trigger, "centre": best}
        self.options["searched_log_posterior"] = round(best_score, 4)
