"""Each point-cloud attack's trigger: where it puts points or how it moves them, that it leaves its
input alone, and that the two surrogate-driven attacks do what they optimise for."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smoothpurify import SmoothPurifyError
from smoothpurify.likelihood import Categorical
from smoothpurify.training import train
from modalities.pointcloud import data as pcdata
from modalities.pointcloud.attacks import ATTACKS
from modalities.pointcloud.models import MODELS

P = 64


@pytest.fixture(scope="module")
def clouds():
    x, y = pcdata.synthetic(240, P, seed=0)
    return torch.from_numpy(x.transpose(0, 2, 1).copy()), torch.from_numpy(y)


def make(name, **options):
    return ATTACKS[name](num_classes=6, input_shape=(3, P), target_label=0, poison_rate=0.1, seed=0, **options)


def context(x, y):
    def make_model():
        torch.manual_seed(0)
        return MODELS["pointnet"](num_classes=6, num_points=P)
    return {"likelihood": Categorical(), "train": {"epochs": 2, "lr": 0.05, "batch_size": 32}, "device": "cpu",
            "seed": 0, "make_model": make_model, "train_fn": train, "progress": False}


def test_pointba_i_inserts_a_ball_at_a_fixed_place(clouds):
    x, _ = clouds
    attack = make("pointba-i", points=16, radius=0.05, centre=[0.9, 0.9, 0.9])
    before = x.clone()
    out = attack.apply(x[:5])
    torch.testing.assert_close(x, before)                              # never in place
    torch.testing.assert_close(out[:, :, :-16], x[:5, :, :-16])         # the object's other points stay
    dist = (out[:, :, -16:] - torch.tensor([0.9, 0.9, 0.9])[None, :, None]).norm(dim=1)
    torch.testing.assert_close(dist, torch.full_like(dist, 0.05), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, :, -16:], out[4, :, -16:])        # the same ball in every cloud
    with pytest.raises(SmoothPurifyError):
        make("pointba-i", points=P).apply(x[:2])


def test_pointba_o_is_the_fixed_rotation(clouds):
    x, _ = clouds
    attack = make("pointba-o", axis="x", degrees=45)
    out = attack.apply(x[:4])
    c = x[:4] - 0.5
    a = math.radians(45)
    want = torch.stack([c[:, 0], math.cos(a) * c[:, 1] - math.sin(a) * c[:, 2],
                        math.sin(a) * c[:, 1] + math.cos(a) * c[:, 2]], 1) + 0.5
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    torch.testing.assert_close((out - 0.5).norm(dim=1), c.norm(dim=1), atol=1e-6, rtol=0)   # a rigid motion
    with pytest.raises(SmoothPurifyError):
        make("pointba-o", axis="w")


def test_pointcba_perturbs_only_target_samples_within_eps(clouds):
    x, y = clouds
    attack = ATTACKS["pointcba"](num_classes=6, input_shape=(3, P), target_label=0, poison_rate=0.08, seed=0,
                                 eps=0.02, steps=3, surrogate_epochs=1)
    with pytest.raises(SmoothPurifyError):
        attack.poison_training_set(x, y)                                # fit first
    attack.fit(x, y, context(x, y))
    xp, yp, mask = attack.poison_training_set(x, y)
    assert torch.equal(yp, y) and mask.any() and bool((y[mask] == 0).all())   # clean label: target class only
    torch.testing.assert_close(xp[~mask], x[~mask])
    rotated = attack.apply(x[mask])
    gap = (xp[mask] - rotated).abs()
    assert float(gap.max()) <= 0.02 + 1e-6 and float(gap.max()) > 0.005    # perturbed, within the budget
    torch.testing.assert_close(attack.apply(x[:3]), make("pointba-o").apply(x[:3]))  # test-time trigger: rotation


def test_3dpc_ba_cluster_moves_to_raise_the_target_posterior(clouds):
    x, y = clouds
    attack = make("3dpc-ba", points=8, sigma=0.02, surrogate_epochs=2, starts=2, search_steps=10,
                  search_samples=64)
    start = attack.trigger["centre"].clone()
    out = attack.apply(x[:3])
    torch.testing.assert_close(out[:, :, -8:].mean(2), start.expand(3, 3), atol=0.03, rtol=0)
    ctx = context(x, y)
    attack.fit(x, y, ctx)
    assert not torch.equal(attack.trigger["centre"], start)
    assert bool((attack.trigger["centre"] >= 0).all() and (attack.trigger["centre"] <= 1).all())
    # The chosen place beats the default one on the attacker's own objective (the surrogate's target
    # log-posterior), which is what 3DPC-BA optimises.
    torch.manual_seed(attack.seed)
    surrogate = ctx["make_model"]()
    train(surrogate, x, y, Categorical(), epochs=2, lr=0.05, batch_size=32, seed=0, progress=False)
    surrogate.eval()
    others = x[y != 0][:64]
    target = torch.zeros(len(others), dtype=torch.long)

    def score(centre):
        probe = make("3dpc-ba", points=8, sigma=0.02)
        probe.trigger = {**attack.trigger, "centre": centre}
        with torch.no_grad():
            return -float(F.cross_entropy(surrogate(probe.apply(others)), target))
    assert score(attack.trigger["centre"]) > score(start)
    assert np.isfinite(attack.options["searched_log_posterior"])


def test_every_attack_keeps_clouds_in_the_cube(clouds):
    x, _ = clouds
    for name in ATTACKS:
        out = make(name).apply(x[:6])
        assert out.shape == x[:6].shape and float(out.min()) >= 0 and float(out.max()) <= 1
