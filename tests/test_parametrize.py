"""full / spectral / last_layer parametrizations and merge-back (SFT paper §5.1)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize as P

from smoothpurify import SmoothPurifyError
from smoothpurify.parametrize import SpectralShift, prepare


class Net(nn.Module):
    """Conv1d/2d/3d (one grouped, one reflect-padded), BN, attention with packed in-proj, Linear."""

    classifier_name = "head"

    def __init__(self):
        super().__init__()
        self.c3d = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.c2d = nn.Conv2d(2, 4, 3, padding=1, groups=2, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(4)
        self.c1d = nn.Conv1d(4, 6, 3, padding=1)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.c3d(x.unsqueeze(1)).mean(2)
        x = torch.relu(self.bn(self.c2d(x)))
        h = self.c1d(x.flatten(2)).transpose(1, 2)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.drop(h.mean(1)))


def make(seed=0):
    torch.manual_seed(seed)
    model = Net()
    x = torch.randn(5, 3, 5, 5)
    model.train()
    with torch.no_grad():  # non-trivial BN running statistics
        model(x)
    return model.eval(), x


def test_spectral_wrap_is_output_identical_with_delta_zero():
    model, x = make()
    expected = model(x)
    tuned = prepare(model, "spectral")
    assert not P.is_parametrized(model.head)  # caller's model untouched (deep copy)
    tuned.eval()
    torch.testing.assert_close(tuned.model(x), expected, rtol=1e-5, atol=1e-6)
    names = set(tuned.named_tuned())
    assert names == {f"{m}.parametrizations.{w}.0.delta" for m, w in [
        ("c3d", "weight"), ("c2d", "weight"), ("c1d", "weight"), ("attn", "in_proj_weight"),
        ("attn.out_proj", "weight"), ("head", "weight")]}
    shift = tuned.model.c2d.parametrizations.weight[0]
    assert isinstance(shift, SpectralShift)
    assert shift.U.shape == (4, 4) and shift.Vh.shape == (4, 9)  # out x (in/groups * k*k)
    assert torch.equal(shift.delta, torch.zeros(4)) and not shift.U.requires_grad
    assert all(a.eq(0).all() for a in tuned.anchor().values())
    assert not tuned.model.head.bias.requires_grad and not tuned.model.bn.weight.requires_grad


def test_spectral_frozen_norm_stays_in_eval_and_flags_configurable():
    model, x = make()
    tuned = prepare(model, "spectral").train()
    assert tuned.model.training and tuned.model.drop.training and not tuned.model.bn.training
    before = tuned.model.bn.running_mean.clone()
    tuned.model(x)
    torch.testing.assert_close(tuned.model.bn.running_mean, before)
    tuned.model.train()  # an external train() is undone by frozen_norm_eval()
    assert tuned.model.bn.training and not tuned.frozen_norm_eval().model.bn.training

    both = prepare(model, "spectral", tune_bias=True, tune_norm=True).train()
    names = set(both.named_tuned())
    assert {"head.bias", "c2d.bias", "attn.in_proj_bias", "attn.out_proj.bias",
            "bn.weight", "bn.bias"} <= names
    assert both.model.bn.training
    assert not any(n.endswith("original") for n in names)


def test_merge_round_trips_and_carries_tuned_shifts():
    model, x = make()
    tuned = prepare(model, "spectral", tune_bias=True)
    merged = tuned.merge()
    ref_sd, sd = model.state_dict(), merged.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(sd[k].shape == ref_sd[k].shape for k in sd)
    assert type(merged.head) is nn.Linear and not P.is_parametrized(merged.attn)
    merged.eval()
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in merged.parameters())

    with torch.no_grad():
        for p in tuned.named_tuned().values():
            p.add_(0.2 * torch.randn_like(p))
        tuned.model.c1d.parametrizations.weight[0].delta[0] = -100.0  # relu clips it to 0
    tuned.eval()
    merged = tuned.merge().eval()
    torch.testing.assert_close(merged(x), tuned.model(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged(x), model(x), atol=1e-3)
    assert torch.linalg.matrix_rank(merged.c1d.weight.reshape(6, -1)) == 5
    assert P.is_parametrized(tuned.model.head)  # merge left the working model alone
    fresh = Net()
    fresh.load_state_dict(sd)  # a plain architecture accepts the merged checkpoint


def test_spectral_keeps_tied_weights_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, tokens):
            return self.out(torch.tanh(self.emb(tokens)))

    torch.manual_seed(0)
    tokens = torch.randint(0, 7, (3, 5))
    tuned = prepare(Tied(), "spectral")
    assert list(tuned.named_tuned()) == ["emb.parametrizations.weight.0.delta"]  # one shared shift
    with torch.no_grad():
        next(iter(tuned.named_tuned().values())).add_(0.3)
    assert torch.equal(tuned.model.emb.weight, tuned.model.out.weight)
    merged = tuned.merge()
    assert merged.emb.weight is merged.out.weight
    torch.testing.assert_close(merged(tokens), tuned.model(tokens))


def test_last_layer_freezes_backbone_for_real():
    model, x = make()
    tuned = prepare(model, "last_layer").train()
    assert set(tuned.named_tuned()) == {"head.weight", "head.bias"}
    assert tuned.classifier == "head"
    m = tuned.model
    assert m.head.training and not m.bn.training and not m.drop.training and not m.training
    out1, out2 = m(x), m(x)  # deterministic backbone (dropout off): features can be cached
    torch.testing.assert_close(out1, out2)
    anchor = tuned.anchor()
    with torch.no_grad():
        m.head.weight.add_(1.0)
    assert not torch.equal(anchor["head.weight"], m.head.weight)  # a detached clone
    torch.testing.assert_close(anchor["head.weight"], model.head.weight)
    assert list(tuned.merge().state_dict()) == list(model.state_dict())


def test_full_tunes_everything_and_names_errors():
    model, x = make()
    for p in model.bn.parameters():
        p.requires_grad_(False)  # full mode overrides a caller's freezing
    tuned = prepare(model, "full").train()
    assert set(tuned.named_tuned()) == {n for n, _ in model.named_parameters()}
    assert tuned.model.bn.training and tuned.eval_modules == ()
    torch.testing.assert_close(tuned.merge().eval()(x), model(x))
    with pytest.raises(SmoothPurifyError, match="unknown parametrization"):
        prepare(model, "lora")
    with pytest.raises(SmoothPurifyError, match="not found"):
        prepare(model, "last_layer", classifier="nope")
    with pytest.raises(SmoothPurifyError, match="no Conv/Linear"):
        prepare(nn.Sequential(nn.BatchNorm1d(3)), "spectral")


def test_inplace_wraps_the_given_model():
    model, x = make()
    tuned = prepare(model, "spectral", inplace=True)
    assert tuned.model is model and P.is_parametrized(model.head)
    with torch.no_grad():
        model.head.parametrizations.weight[0].delta.fill_(0.5)
    w = model.head.weight
    sv = torch.linalg.svdvals(w)
    ref = torch.linalg.svdvals(tuned.merge().head.weight)
    torch.testing.assert_close(sv, ref)
    assert F.mse_loss(w, tuned.merge().head.weight) < 1e-12


def test_baking_a_copy_leaves_the_working_model_parametrized():
    """Curves take lambda_max of a baked copy mid-tuning (paper profile: curve_every, curve_lambda_steps);
    ``remove_parametrizations`` on a deep copy would strip the shared class's weight property."""
    from pipeline.curves import plain_copy

    model, x = make()
    tuned = prepare(model, "spectral").eval()
    with torch.no_grad():
        for p in tuned.named_tuned().values():
            p.add_(0.1)
        expected = tuned.model(x)
        for _ in range(2):
            plain = plain_copy(tuned.model)
            assert not any(P.is_parametrized(m) for m in plain.modules())
            assert torch.allclose(plain(x), expected, atol=1e-6)
        assert torch.allclose(tuned.model(x), expected)  # still computes its weights
        assert torch.allclose(tuned.merge()(x), expected, atol=1e-6)
