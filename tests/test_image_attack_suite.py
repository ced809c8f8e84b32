"""The full image attack suite: each attack's mechanics as its paper describes them, on tiny inputs,
plus the save -> load round trip every attack must survive (the trigger file is all evaluation has)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_images
from modalities.image import ImageModality
from modalities.image.attacks import ATTACKS, create_attack
from modalities.image.attacks.bppa import floyd_steinberg, quantize
from modalities.image.attacks.nets import NetAttack
from modalities.image.models import create_model
from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import save_checkpoint
from smoothpurify.likelihood import Categorical
from smoothpurify.training import train

SHAPE = (1, 12, 12)


def make(name, **kw):
    return create_attack(name, num_classes=10, input_shape=SHAPE, **kw)


@pytest.fixture(scope="module")
def data():
    x, y = tiny_images(200, seed=3)
    return torch.from_numpy(x).float() / 255, torch.from_numpy(y)


def context(epochs=1):
    return {"likelihood": Categorical(), "train": {"epochs": epochs, "lr": 0.05, "batch_size": 64},
            "device": "cpu", "seed": 0, "make_model": lambda: create_model("small_cnn", 10, 1, 12),
            "train_fn": train, "progress": False}


def fresh_model():
    torch.manual_seed(0)
    return create_model("small_cnn", 10, 1, 12)


def weights(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


# ---------------------------------------------------------------------------------------- CLB
def test_clb_is_label_consistent_and_bounded(data):
    x, y = data
    atk = make("clb", poison_rate=0.1, target_label=2, surrogate_epochs=1, steps=3)
    with pytest.raises(SmoothPurifyError, match="fit"):
        atk.poison_training_set(x, y)
    atk.fit(x, y, context())
    xp, yp, mask = atk.poison_training_set(x, y)
    assert torch.equal(yp, y) and torch.all(y[mask] == 2) and int(mask.sum()) == 20
    assert torch.equal(xp[~mask], x[~mask])
    corners = atk.trigger["mask"].bool().expand_as(xp[mask])
    assert int(atk.trigger["mask"].sum()) == 4 * 9  # a 3x3 checkerboard in each corner
    assert torch.equal(xp[mask][corners], atk.trigger["pattern"].expand_as(xp[mask])[corners])
    delta = (xp[mask] - x[mask])[~corners]
    assert delta.abs().max() <= atk.eps + 1e-6 and delta.abs().max() > atk.eps / 2  # PGD moved them
    # The test-time trigger is the corners alone: no perturbation elsewhere.
    assert torch.equal(atk.apply(x)[:, :, 4:8, :], x[:, :, 4:8, :])
    with pytest.raises(SmoothPurifyError, match="clean-label"):
        make("clb", mapping="all2all")


# ---------------------------------------------------------------------------------------- WaNet
def test_wanet_small_warp_and_noise_mode(data):
    x, y = data
    atk = make("wanet", poison_rate=0.1, s=0.5)  # the paper's strength
    field = atk.trigger["field"]
    assert field.shape == (2, 12, 12) and torch.isfinite(field).all()
    shift_px = (atk.grid() - atk.identity_grid()).abs() * (SHAPE[1] - 1) / 2  # grid units -> pixels
    # s * field / H in grid units is at most s * |field| / 2 pixels; on average a sub-pixel warp.
    assert shift_px.max() <= atk.strength * field.abs().max() / 2 + 1e-5 and shift_px.mean() < 0.5
    warped = atk.apply(x)
    assert 0 < (warped - x).abs().mean() < 0.1
    xp, yp, mask = atk.poison_training_set(x, y)
    noise = atk.noise_mask
    assert int(noise.sum()) == 2 * int(mask.sum()) and not (noise & mask).any()
    assert torch.equal(yp[noise], y[noise]) and torch.all(yp[mask] == 0)
    assert torch.equal(xp[mask], atk.apply(x[mask]))
    assert not torch.allclose(xp[noise], atk.apply(x[noise]))  # jittered, not the exact trigger
    assert torch.equal(xp[~mask & ~noise], x[~mask & ~noise])


# ---------------------------------------------------------------------------------------- Dynamic
def test_dynamic_trigger_is_input_specific_and_trained_jointly(data):
    x, y = data
    atk = make("dynamic", poison_rate=0.1, mask_epochs=2, density=0.1)
    atk.fit(x, y, context())
    m = atk.masks(x[:20])
    assert 0.0 < m.mean() < 0.25  # the norm penalty kept masks sparse
    before = weights(atk.nets["pattern"])
    xp, yp, mask = atk.poison_training_set(x, y)
    assert torch.equal(xp, x) and int(mask.sum()) == 20  # poisoning happens on the fly
    losses = atk.train_model(fresh_model(), xp, yp, mask, context())
    assert len(losses) == 1 and not torch.equal(before, weights(atk.nets["pattern"]))
    a, b = atk.apply(x[:1]), atk.apply(x[1:2])
    trig_a, trig_b = a - x[:1], b - x[1:2]
    assert not torch.allclose(trig_a, trig_b, atol=1e-3)  # different inputs, different triggers
    cross = atk.stamp(x[:1], x[1:2])  # a's image with b's trigger is not a's own poisoned version
    assert not torch.allclose(cross, a, atol=1e-3)
    assert make("dynamic-all").mapping == "all2all"
    assert torch.equal(make("dynamic-all").target_of(torch.tensor([0, 9])), torch.tensor([1, 0]))


# ---------------------------------------------------------------------------------------- LIRA
def test_lira_residual_bounded_and_generator_frozen_after_stage_one(data):
    x, y = data
    atk = make("lira", eps=0.05)
    xp, yp, mask = atk.poison_training_set(x, y)
    init = weights(atk.nets["generator"])
    atk.train_model(fresh_model(), xp, yp, mask, {**context(2), "train": {**context()["train"], "epochs": 2}})
    trained = weights(atk.nets["generator"])
    assert not torch.equal(init, trained)
    residual = atk.apply(x) - x
    assert residual.abs().max() <= 0.05 + 1e-6 and residual.abs().mean() > 1e-3
    frozen = make("lira", joint_epochs=0)
    frozen.train_model(fresh_model(), xp, yp, mask, context())
    assert torch.equal(weights(frozen.nets["generator"]), init)  # stage 2 alone never moves it


# ---------------------------------------------------------------------------------------- ISSBA
def test_issba_residual_bounded_sample_specific_and_decodable(data):
    x, y = data
    atk = make("issba", eps=0.08, encoder_steps=150, bits=8, encoder_lr=1e-2, lambda_residual=1.0)
    atk.fit(x, y, context())
    r = atk.apply(x[:8]) - x[:8]
    assert r.abs().max() <= 0.08 + 1e-6 and r.pow(2).mean().sqrt() < 0.08
    assert not torch.allclose(r[0], r[1], atol=1e-3)  # sample-specific
    assert atk.bit_accuracy >= 0.75, atk.bit_accuracy  # the residual carries the secret
    assert atk.trigger["secret"].shape == (8,) and set(atk.trigger["secret"].tolist()) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------- BPPA
def test_bppa_output_on_quantized_grid_with_dithering(data):
    x, y = data
    atk = make("bppa", bits=3)
    xp = atk.apply(x[:16])
    levels = xp * 7
    assert torch.allclose(levels, levels.round(), atol=1e-5) and levels.unique().numel() > 2
    # Dithering keeps local averages closer to the original than plain rounding does.
    grey = torch.full((1, 1, 12, 12), 0.5)  # halfway between two levels (3/7 and 4/7)
    pool = torch.nn.functional.avg_pool2d
    err_dither = (pool(floyd_steinberg(grey, 8), 4) - 0.5).abs().mean()
    err_round = (pool(quantize(grey, 8), 4) - 0.5).abs().mean()
    assert err_dither < err_round / 3
    xp, yp, mask = atk.poison_training_set(x, y)
    calls = []
    import modalities.image.attacks.bppa as bppa_mod
    real = bppa_mod.pgd
    bppa_mod.pgd = lambda *a, **k: calls.append(k["targeted"]) or real(*a, **k)
    try:
        losses = atk.train_model(fresh_model(), xp, yp, mask, context())
    finally:
        bppa_mod.pgd = real
    assert len(losses) == 1 and calls and all(calls)  # target-ward adversarial negatives, every batch


# ---------------------------------------------------------------------------------------- CBA
def test_cba_mixes_two_source_classes(data):
    x, y = data
    atk = make("cba", poison_rate=0.1, target_label=0, sources=[3, 5])
    xp, yp, mask = atk.poison_training_set(x, y)
    left, right = atk.mix_sources
    assert torch.all(y[left] == 3) and torch.all(y[right] == 5) and torch.all(yp[mask] == 0)
    assert torch.equal(xp[mask][..., :6], x[left][..., :6]) and torch.equal(xp[mask][..., 6:], x[right][..., 6:])
    neg = atk.negative_mask
    assert int(neg.sum()) == 20 and not (neg & mask).any() and torch.equal(yp[neg], y[neg])
    assert torch.equal(xp[neg][..., :6], x[neg][..., :6])  # same-class mixtures keep their label
    xt, y_true, y_target = atk.poisoned_test_set(x, y)
    assert len(xt) == int((y == 3).sum()) and torch.all(y_true == 3) and torch.all(y_target == 0)
    assert torch.equal(xt[..., :6], x[y == 3][..., :6])
    assert torch.all((atk.trigger["bank"] == x[y == 5].unsqueeze(1)).flatten(2).all(-1).any(0))
    with pytest.raises(SmoothPurifyError, match="all2one"):
        make("cba", mapping="all2all")
    with pytest.raises(SmoothPurifyError, match="distinct"):
        make("cba", sources=[0, 1])


# ---------------------------------------------------------------------------------------- FBA
def test_fba_style_trigger_and_detoxification(data):
    x, y = data
    atk = make("fba", detox_after=1, detox_neurons=4)
    xs = atk.apply(x[:4])
    assert (xs - x[:4]).abs().mean() > 0.05 and torch.equal(xs, make("fba").apply(x[:4]))
    assert not torch.equal(xs, make("fba", seed=1).apply(x[:4]))
    xp, yp, mask = atk.poison_training_set(x, y)
    model = fresh_model()
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(len(a[0])))
    losses = atk.train_model(model, xp, yp, mask, {**context(), "train": {**context()["train"], "epochs": 2}})
    assert len(losses) == 2
    n_batches = -(-len(y) // 64)
    # Epoch 1 plain batches; epoch 2 batches carry detoxicants (bigger than the plain ones).
    assert max(seen) > 64 and sum(s > 64 for s in seen) >= n_batches - 1


# ---------------------------------------------------------------------------------------- mixture
def test_mixture_shares_and_union_test_set(data):
    x, y = data
    atk = make("mixture", poison_rate=0.3, component_options={"blend": {"alpha": 0.3}})
    assert [c.name for c in atk.components] == ["badnets", "blend", "trojan"]
    assert atk.components[1].alpha == 0.3
    xp, yp, mask = atk.poison_training_set(x, y)
    counts = torch.bincount(atk.component_of[mask], minlength=3)
    assert int(mask.sum()) == 60 and counts.tolist() == [20, 20, 20] and torch.all(yp[mask] == 0)
    for i, c in enumerate(atk.components):
        sel = atk.component_of == i
        assert torch.allclose(xp[sel], c.apply(x[sel]))
    xt, y_true, _ = atk.poisoned_test_set(x, y)
    assert len(xt) == 3 * int((y != 0).sum())
    with pytest.raises(SmoothPurifyError, match="label-poisoning"):
        make("mixture", components=["badnets", "sig"])


# ---------------------------------------------------------------------------------------- rates
@pytest.mark.parametrize("name", ["badnets", "blend", "trojan", "wanet", "bppa", "fba", "mixture"])
def test_half_poisoned_all2all(name, data):
    x, y = data
    atk = make(name, poison_rate=0.5, mapping="all2all")
    _, yp, mask = atk.poison_training_set(x, y)
    assert int(mask.sum()) == 100 and torch.equal(yp[mask], (y[mask] + 1) % 10)
    assert torch.equal(yp[~mask], y[~mask])
    one = make(name, poison_rate=0.5, mapping="all2one", target_label=4)
    _, yp1, mask1 = one.poison_training_set(x, y)
    assert int(mask1.sum()) == 100 and torch.all(yp1[mask1] == 4) and torch.all(y[mask1] != 4)


def test_named_variants_set_strength_mapping_and_options():
    mod, meta = ImageModality(), {"num_classes": 10, "input_shape": list(SHAPE)}
    params = {"image": {"attack": {"poison_rate": 0.1, "options": {"blend": {"alpha": 0.2}}, "variants": {
        "blend-50": {"attack": "blend", "poison_rate": 0.5, "options": {"alpha": 0.3}},
        "badnets-a2a": {"attack": "badnets", "mapping": "all2all"}}}}}
    assert {"blend-50", "badnets-a2a", "badnets"} <= set(mod.attack_names(params))
    strong = mod.create_attack("blend-50", params, meta)
    assert type(strong).__name__ == "Blend" and strong.poison_rate == 0.5 and strong.options["alpha"] == 0.3
    plain = mod.create_attack("blend", params, meta)
    assert plain.poison_rate == 0.1 and plain.options["alpha"] == 0.2
    assert mod.create_attack("badnets-a2a", params, meta).mapping == "all2all"
    for variants, msg in [({"badnets": {"attack": "blend"}}, "taken by a registered attack"),
                          ({"x": {"attack": "nosuch"}}, "unknown attack 'nosuch'"),
                          ({"x": {"attack": "blend", "poison_rate": 2}}, "must be in")]:
        with pytest.raises(SmoothPurifyError, match=msg):
            mod.create_attack("blend", {"image": {"attack": {"variants": variants}}}, meta)
    with pytest.raises(SmoothPurifyError, match="unknown attack 'blend-5'"):
        mod.create_attack("blend-5", params, meta)


# ---------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_trigger_round_trip_through_safetensors(name, data, tmp_path):
    x, y = data
    opts = {"clb": {"surrogate_epochs": 1, "steps": 1}, "issba": {"encoder_steps": 2},
            "dynamic": {"mask_samples": 64}, "dynamic-all": {"mask_samples": 64}}.get(name, {})
    atk = make(name, seed=3, **opts)
    atk.fit(x, y, context())
    if isinstance(atk, NetAttack):  # as if trained: the file must carry the weights, not the seed
        with torch.no_grad():
            for p in atk.nets.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    expected = atk.apply(x[:10])
    save_checkpoint(tmp_path / "trigger.safetensors", atk.state_dict(), atk.describe())
    loaded = ImageModality().load_attack(tmp_path, {"num_classes": 10, "input_shape": list(SHAPE)})
    assert type(loaded) is type(atk) and loaded.describe() == atk.describe()
    assert torch.equal(loaded.apply(x[:10]), expected)
    assert not torch.equal(expected, x[:10])


@pytest.mark.parametrize("name", ["wanet", "dynamic", "lira", "issba", "fba", "bppa"])
def test_same_seed_same_trigger(name, data):
    x, _ = data
    a, b, c = make(name, seed=7), make(name, seed=7), make(name, seed=8)
    assert torch.equal(a.apply(x[:4]), b.apply(x[:4]))
    if name != "bppa":  # quantization has no randomness to seed
        assert not torch.equal(a.apply(x[:4]), c.apply(x[:4]))


def test_learned_attack_through_the_pipeline(tiny_params):
    """A generator attack end to end: trained jointly, its weights saved, reloaded for evaluation."""
    import pipeline

    params = {**tiny_params, "image": {**tiny_params["image"], "train": {"epochs": 3, "lr": 0.05, "batch_size": 64}}}
    pipeline.prepare("image", params)
    pipeline.train_attack("image", params, "lira", progress=False)
    rec = pipeline.evaluate("image", params, "lira")
    assert rec["backdoored"]["asr"] >= 0.8, rec
    assert rec["backdoored"]["acc"] >= 0.8, rec
