"""The point-cloud overlay of the purification presets: clusters cut from a partner cloud, inserted."""
from __future__ import annotations

import torch

from smoothpurify.likelihood import Categorical
from smoothpurify.methods import method_config
from smoothpurify.objective import Objective
from smoothpurify.purify import purify, seeded_global_rng
from modalities.contract import get_modality, method_defaults
from modalities.pointcloud.overlay import CLUSTER_RADIUS, CLUSTER_REGION, insert_clusters


def _clouds(n: int, p: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, p, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05


def test_inserted_cluster_is_the_partners_nearest_points_rescaled_and_moved():
    p = 128
    x, partners = _clouds(6, p, 1), _clouds(6, p, 2)
    weights = torch.tensor([0.0, 0.1, 0.15, 0.05, 0.0, 0.12])
    out = insert_clusters(x, partners, weights, torch.Generator().manual_seed(3))
    for i in range(6):
        changed = (out[i] != x[i]).any(0)
        k = round(float(weights[i]) * p)
        assert int(changed.sum()) == k                         # exactly k points replaced (none if w = 0)
        assert not changed[0]                                  # farthest point sampling's start stays on the object
        if k == 0:
            continue
        cluster = out[i][:, changed]
        centre = cluster.mean(1)
        radius = float((cluster - centre[:, None]).norm(dim=0).max())
        assert CLUSTER_RADIUS[0] - 1e-5 <= radius <= CLUSTER_RADIUS[1] + 1e-5
        assert ((centre >= CLUSTER_REGION[0] - 1e-5) & (centre <= CLUSTER_REGION[1] + 1e-5)).all()
        # Brute force: the cluster is a scaled copy of the k partner points nearest to one of them.
        d_cluster = torch.cdist(cluster.T, cluster.T)
        scale = None
        for s in range(p):
            near = (partners[i] - partners[i][:, s:s + 1]).norm(dim=0).argsort()[:k]
            d_near = torch.cdist(partners[i][:, near].T, partners[i][:, near].T)
            ratio = d_cluster.sum() / d_near.sum()
            if torch.allclose(torch.sort(d_cluster.flatten()).values, torch.sort(d_near.flatten()).values * ratio,
                              atol=1e-5):
                scale = float(ratio)
                break
        assert scale is not None and scale > 0


def test_the_point_cloud_overlay_replaces_the_blend_in_the_objective():
    mod = get_modality("pointcloud")
    x = _clouds(64, 32, 4)
    obj = Objective(Categorical(), overlay_max=0.15, overlay_fn=mod.overlay,
                    generator=torch.Generator().manual_seed(5))
    view = obj.overlay_view(x)
    changed = (view != x).any(1)                               # [N, P]: which points moved
    touched = changed.any(1)
    assert 16 < int(touched.sum()) < 48                        # about half the clouds (weights drawn in (0, 0.15])
    assert int(changed.sum(1).max()) <= round(0.15 * 32)
    # Untouched points are exactly the originals (a blend would move every point of a cloud).
    assert torch.equal(view[~changed.unsqueeze(1).expand_as(view)], x[~changed.unsqueeze(1).expand_as(x)])


def test_purify_hands_the_modality_overlay_to_the_objective():
    calls = []

    def overlay(inputs, partners, weights, generator):
        calls.append(weights.clone())
        return inputs

    torch.manual_seed(0)
    mod = get_modality("pointcloud")
    model = mod.create_model("pointnet", num_classes=3, num_points=32)
    x, y = _clouds(24, 32, 6), torch.arange(24) % 3
    cfg = method_config("recommended", {"epochs": 1, "batch_size": 12, "augment": False})
    purify(model, x, y, Categorical(), cfg, progress=False, overlay=overlay)
    assert len(calls) == 2 and all(float(w.max()) <= 0.15 for w in calls)


def test_point_clouds_run_recommended_with_their_overlay():
    mod = get_modality("pointcloud")
    assert "overlay_max" not in method_defaults(mod, "recommended")
    assert method_defaults(mod, "recommended") == {"distill_weight": 10.0}
    assert method_config("recommended").overlay_max > 0


def test_the_cluster_overlay_lowers_the_asr_of_an_inserted_ball_that_plain_recommended_leaves(tmp_path):
    """A PointBA-I model of the conformance data (synthetic primitives, PointNet, 60 clean validation
    clouds): `recommended` with the cluster overlay lowers its ASR well below where the same preset
    without the overlay leaves it (measured: 0.39 against 0.80)."""
    from modalities.testing import build

    built = build("pointcloud", tmp_path)
    mod = built.modality
    model, _ = mod.load_model(built.model_dir(built.attack))
    attack = mod.load_attack(built.model_dir(built.attack), mod.data_meta(built.data_dir))
    assert mod.evaluate(model, built.data_dir, attack)["asr"] > 0.95
    x, y = mod.load_split(built.data_dir, "val")
    asr = {}
    for overlay_max in (0.15, 0.0):
        cfg = method_config("recommended", {"overlay_max": overlay_max})
        with seeded_global_rng(0):  # PointNet's head has dropout: the same draws in any process
            out = purify(model, x, y, mod.likelihood, cfg, progress=False, augment=mod.augment,
                         overlay=mod.overlay).model
        asr[overlay_max] = mod.evaluate(out, built.data_dir, attack)["asr"]
    assert asr[0.15] < 0.6 and asr[0.15] < asr[0.0] - 0.2, asr
