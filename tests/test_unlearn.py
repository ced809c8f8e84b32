"""Neural Cleanse's unlearning (smoothpurify.unlearn) with the point clouds' trigger families: each family
stays within its budget, the search finds a planted shortcut and its class, the views lay triggers on
the share asked, and a really backdoored PointNet loses its backdoor."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.likelihood import Categorical
from smoothpurify.runner import make_runner
from smoothpurify.unlearn import (BudgetedPatch, InversionSettings, InvertedTrigger, TriggerViews, invert_triggers,
                                  search_epochs)
from modalities.contract import unlearn_families
from modalities.pointcloud.triggers import ClusterInsertion, Tilt
from modalities.testing import build

CORNER = torch.tensor([0.9, 0.9, 0.9])


def clouds(n: int, p: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand(n, 3, p, generator=g)   # inside [0.3, 0.7]^3: nothing near the corner


def test_cluster_insertion_replaces_the_last_points_within_its_budget():
    fam, x = ClusterInsertion(), clouds(5)
    theta = fam.init(x[0], torch.Generator().manual_seed(1))
    out = fam.apply(x, theta)
    k = fam.points(x[0])
    assert k == 8 and out.shape == x.shape
    assert torch.equal(out[..., :-k], x[..., :-k])
    pts = fam.cluster(theta)
    assert torch.equal(out[0, :, -k:], pts) and torch.equal(out[4, :, -k:], pts)
    centre = torch.sigmoid(theta["centre"])
    assert bool(((pts - centre[:, None]).abs() <= fam.radius + 1e-6).all())


def test_tilt_is_a_rotation_about_the_centre_within_its_budget():
    fam, x = Tilt(max_degrees=60), clouds(3)
    theta = {"angles": torch.tensor([50.0, -50.0, 0.3])}   # saturates two axes at the budget
    r = fam.matrix(theta)
    assert torch.allclose(r @ r.T, torch.eye(3), atol=1e-5) and math.isclose(float(torch.det(r)), 1.0, abs_tol=1e-5)
    out = fam.apply(x, theta)
    assert torch.allclose((out - 0.5).norm(dim=1), (x - 0.5).norm(dim=1), atol=1e-5)
    assert max(abs(a) for a in fam.describe(theta)["axis_angle_degrees"]) <= 60.0
    # 45 degrees about x, built by hand, is what the axis-angle (45, 0, 0) gives.
    c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)
    by_hand = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]])
    angle = torch.tensor([math.atanh(45 / 60), 0.0, 0.0])
    assert torch.allclose(fam.matrix({"angles": angle}), by_hand, atol=1e-5)


def class_clouds(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ``c``'s clouds are shifted along x by ``0.1 c`` (all inside [0.3, 0.8]^3)."""
    y = torch.arange(n) % 4
    x = 0.3 + 0.2 * torch.rand(n, 3, 64, generator=torch.Generator().manual_seed(0))
    x[:, 0] += 0.1 * y[:, None]
    return x, y


class CornerShortcut(nn.Module):
    """Classifies ``class_clouds`` by their mean x; class 2's logit also counts the points near CORNER
    (a planted insertion backdoor)."""

    def forward(self, x):
        centres = 0.4 + 0.1 * torch.arange(4)
        logits = -200.0 * (x[:, 0].mean(1, keepdim=True) - centres) ** 2
        near = torch.exp(-((x - CORNER[None, :, None]) ** 2).sum(1) / 0.01).sum(1)
        return logits + torch.stack([torch.zeros_like(near)] * 2 + [2.0 * near] + [torch.zeros_like(near)], 1)


def test_inversion_finds_a_planted_shortcut_its_class_and_place():
    x, y = class_clouds(40)
    assert bool((CornerShortcut()(x).argmax(1) == y).all())
    found = invert_triggers(CornerShortcut(), x, y, 4, {"cluster": ClusterInsertion()},
                            InversionSettings(steps=40, restarts=2), generator=torch.Generator().manual_seed(0),
                            progress=False)
    (trig,) = found
    assert trig.target == 2 and trig.success == 1.0
    assert max(s for c, s in enumerate(trig.successes) if c != 2) < 0.7
    centre = torch.tensor(trig.to_record(ClusterInsertion())["trigger"]["centre"])
    assert float((centre - CORNER).norm()) < 0.15


def test_trigger_views_lay_triggers_on_the_share_asked():
    x, fam = clouds(200), ClusterInsertion()
    trig = InvertedTrigger("cluster", 0, 1.0, fam.init(x[0], torch.Generator().manual_seed(0)))
    views = lambda share: TriggerViews([trig], {"cluster": fam}, share, torch.Generator().manual_seed(0))(x)  # noqa: E731
    assert torch.equal(views(0.0), x)
    assert torch.equal(views(1.0), fam.apply(x, trig.theta))
    changed = (views(0.2) != x).flatten(1).any(1)
    assert 20 <= int(changed.sum()) <= 60
    assert torch.equal(views(0.2)[~changed], x[~changed])


def test_unlearning_without_families_is_one_clear_error():
    x, y = clouds(16), torch.arange(16) % 4
    _, run = make_runner("ft", {"unlearn_share": 0.2, "epochs": 1})
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 4))
    with pytest.raises(SmoothPurifyError, match="no trigger family"):
        run(model, x, y, Categorical(), progress=False)


def backdoored_pointnet(tmp_path):
    """The conformance build's PointNet backdoored by PointBA-I: (build, trigger, model, clean val x, y)."""
    built = build("pointcloud", tmp_path / "run")
    mod = built.modality
    trigger = mod.load_attack(built.model_dir(built.attack), mod.data_meta(built.data_dir))
    model, _ = mod.load_model(built.model_dir(built.attack))
    x, y = mod.load_split(built.data_dir, "val")
    return built, trigger, model, x, y


def test_unlearning_removes_a_real_pointba_i_backdoor(tmp_path):
    built, trigger, model, x, y = backdoored_pointnet(tmp_path)
    mod = built.modality
    before = mod.evaluate(model, built.data_dir, trigger)
    assert before["asr"] > 0.8, before
    _, run = make_runner("ft", {"unlearn_share": 0.2, "epochs": 10, "lr_step": None, "unlearn_steps": 30})
    result = run(model, x, y, mod.likelihood, seed=0, augment=mod.augment, unlearn_families=unlearn_families(mod),
                 progress=False)
    # On these tiny clouds (64 points, six primitive shapes) an eighth of the points sends every input to
    # the target and to one natural class alike: both are unlearnt.
    clusters = [t for t in result.record["unlearned_triggers"] if t["family"] == "cluster"]
    assert trigger.target_label in [t["target"] for t in clusters]
    after = mod.evaluate(result.model, built.data_dir, trigger)
    assert after["asr"] < 0.2 and after["acc"] > before["acc"] - 0.1, (before, after)


def test_grid_starts_are_the_grid_points_each_class_reaches_best():
    """With no Adam step the search returns its starts: each class's best grid tilt, by brute force."""
    x, y = clouds(30, p=16), torch.arange(30) % 3
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    nn.init.normal_(model[1].weight, std=3.0, generator=torch.Generator().manual_seed(2))
    fam = Tilt()
    found = invert_triggers(model, x, y, 3, {"tilt": fam}, InversionSettings(steps=0, restarts=1, grid=True),
                            generator=torch.Generator().manual_seed(0), progress=False)
    best = []
    for t in range(3):
        def score(theta):
            with torch.no_grad():
                out = model(fam.apply(x[y != t], theta)).log_softmax(-1)
            return float((out.argmax(-1) == t).float().mean()), float(out[:, t].mean())
        best.append(max(fam.grid(x[0]), key=score))
        shares = found[0].successes
        assert shares[t] == pytest.approx(score(best[t])[0])
    assert len(fam.grid(x[0])) == 125
    for trig in found:
        assert torch.allclose(trig.theta["angles"], best[trig.target]["angles"])


@pytest.mark.parametrize("epochs,rounds", [(20, 3), (20, 1), (7, 2), (2, 5), (100, 4)])
def test_search_epochs_cut_the_tuning_into_equal_parts(epochs, rounds):
    starts = search_epochs(epochs, rounds)
    assert starts[0] == 1 and starts == sorted(set(starts)) and len(starts) == min(rounds, epochs)
    lengths = [b - a for a, b in zip(starts, starts[1:] + [epochs + 1])]
    assert max(lengths) - min(lengths) <= 1 and sum(lengths) == epochs


def test_a_later_round_searches_the_model_being_tuned(tmp_path):
    """Two rounds on a really backdoored PointNet: the second search (at epoch 6 of 10) looks at the tuned
    model, whose backdoor the first round's triggers have removed, so the target's cluster reaches far fewer
    inputs there than in the received model."""
    built, trigger, model, x, y = backdoored_pointnet(tmp_path)
    mod = built.modality
    _, run = make_runner("ft", {"unlearn_share": 0.2, "epochs": 10, "lr_step": None, "unlearn_steps": 30,
                                "unlearn_rounds": 2, "unlearn_only": ["cluster"]})
    record = run(model, x, y, mod.likelihood, seed=0, augment=mod.augment, unlearn_families=unlearn_families(mod),
                 progress=False).record
    found = record["unlearned_triggers"]
    assert sorted({t["epoch"] for t in found}) == [1, 6]
    first, later = ([t["per_class"][trigger.target_label] for t in found if t["epoch"] == e][0] for e in (1, 6))
    assert first > 0.8 and later < first - 0.4, found


@pytest.mark.parametrize("static", [False, True])
def test_budgeted_patch_never_covers_more_than_its_share(static):
    fam = BudgetedPatch(share=0.1, static=static)
    clip = torch.rand(4, 1, 8, 16, 16)
    theta = fam.init(clip[0], torch.Generator().manual_seed(0))
    theta["mask"] = theta["mask"] + 10.0   # every pixel wants in: the budget scales the mask down
    m = fam.mask(theta)
    assert float(m.sum()) == pytest.approx(0.1 * 16 * 16, rel=1e-5)
    out = fam.apply(clip, theta)
    assert out.shape == clip.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    frames_differ = not torch.allclose(out[0, :, 0] - (1 - m) * clip[0, :, 0], out[0, :, 1] - (1 - m) * clip[0, :, 1])
    assert frames_differ != static   # a static pattern is the same picture in every frame
    theta["mask"] = torch.full((16, 16), -20.0)   # a tiny mask is left as it is
    assert float(fam.mask(theta).sum()) < 1e-3
