"""The purification loop: presets compose as configured, NGF leaves the backbone untouched,
the core purifies a non-image model, and fsft / ngf lower ASR on a really backdoored tiny model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from smoothpurify import SmoothPurifyError
import pipeline
from smoothpurify.likelihood import Categorical
from smoothpurify.methods import PRESETS, method_config
from smoothpurify.purify import diverged, purify


class TinyCNN(nn.Module):
    classifier_name = "head"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


class PixelShift:
    """A budgeted trigger for the unlearning presets on toy images: ``x + 0.5 tanh(d)``."""

    def init(self, example, generator):
        return {"d": torch.randn(example.shape, generator=generator)}

    def apply(self, x, theta):
        return x + 0.5 * torch.tanh(theta["d"])

    def describe(self, theta):
        return {"kind": "shift"}


def toy_data(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = torch.arange(n) % 3
    x[torch.arange(n), 0, y, 0] += 2.0
    return x, y


@pytest.mark.parametrize("method", list(PRESETS))
def test_every_preset_runs_and_keeps_architecture(method):
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    cfg = method_config(method, {"epochs": 2, "batch_size": 16, "iterations": None, "unlearn_steps": 2})
    result = purify(model, x, y, Categorical(), cfg, progress=False, unlearn_families={"shift": PixelShift()})
    assert list(result.model.state_dict()) == list(model.state_dict())
    assert result.record["method"] == method and len(result.record["val_loss"]) == 2
    assert set(result.record["seconds"]) == {"setup", "tuning", "total"}


def test_sam_takes_two_gradients_per_step():
    """SAM's ascent must use the gradient at the current weights, then descend from w + e."""
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    calls = []

    class Counting(Categorical):
        def nll(self, outputs, targets):
            if torch.is_grad_enabled():
                calls.append(len(targets))
            return super().nll(outputs, targets)

    purify(model, x, y, Counting(), method_config("ft-sam", {"epochs": 1, "batch_size": 16}), progress=False)
    assert calls == [16] * 6  # 3 steps x (gradient at w + gradient at w + e)


def test_ngf_changes_only_the_classifier_bit_for_bit():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = purify(model, x, y, Categorical(), method_config("ngf", {"epochs": 5}), progress=False)
    after = result.model.state_dict()
    for key, value in before.items():
        if key.startswith("head."):
            assert not torch.equal(after[key], value), key
        else:  # conv weights, BN affine AND running statistics
            assert torch.equal(after[key], value), key


def test_objective_terms_switch_off_by_configuration():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    full = purify(model, x, y, Categorical(), method_config("fsft", {"epochs": 1, "trace_every": 1}), progress=False)
    no_trace = purify(model, x, y, Categorical(), method_config("fsft-no-trace", {"epochs": 1}), progress=False)
    assert "trace_f" in full.record["last_step"] and "anchor" in full.record["last_step"]
    assert "trace_f" not in no_trace.record["last_step"] and "anchor" in no_trace.record["last_step"]


def test_divergence_guard_and_bad_data():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    x_bad = x.clone()
    x_bad[0] = float("nan")
    with pytest.raises(SmoothPurifyError, match="loss became nan"):
        purify(model, x_bad, y, Categorical(), method_config("ft", {"epochs": 1}), progress=False)
    with pytest.raises(SmoothPurifyError, match="single class"):
        purify(model, x, torch.zeros_like(y), Categorical(), method_config("ft", {"epochs": 1}), progress=False)
    with pytest.raises(SmoothPurifyError, match="unknown purification method"):
        method_config("sft2")


def test_a_blown_up_clean_loss_is_flagged_as_diverged():
    """ASR 0 from a destroyed model is not a purification: the record and a warning must say so."""
    assert diverged(0.4, 2.3) and diverged(0.4, float("nan")) and not diverged(0.4, 0.7) and not diverged(0.1, 0.3)
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    calm = purify(model, x, y, Categorical(), method_config("ft", {"epochs": 5, "batch_size": 16}), progress=False)
    assert not calm.record["diverged"] and calm.record["val_loss"][-1] < calm.record["val_loss_start"]
    with pytest.warns(RuntimeWarning, match="ft: the clean validation loss rose"):
        wild = purify(model, x, y, Categorical(), method_config("ft", {"epochs": 5, "batch_size": 16, "lr": 3.0}),
                      progress=False)
    assert wild.record["diverged"]


def test_max_grad_norm_bounds_every_step():
    torch.manual_seed(0)
    model, (x, y) = TinyCNN(), toy_data()
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    for clip, bound in ((None, None), (0.01, 0.01)):
        cfg = method_config("ft", {"epochs": 1, "batch_size": None, "lr": 1.0, "momentum": 0.0,
                                   "weight_decay": 0.0, "lr_step": None, "max_grad_norm": clip})
        result = purify(model, x, y, Categorical(), cfg, progress=False)
        moved = (torch.cat([p.detach().flatten() for p in result.model.parameters()]) - start).norm()
        if bound is None:
            assert moved > 0.1  # one plain step of lr 1 goes far on this model
        else:
            assert 0 < moved <= bound * 1.0001  # one step: lr x clipped gradient


class TokenTagger(nn.Module):
    """A 1-D sequence model: per-token classes from an embedding + 1-D conv (tuple input: tokens, mask)."""

    classifier_name = "out"

    def __init__(self, vocab=12, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.out = nn.Linear(8, classes)

    def forward(self, tokens, mask):
        h = torch.relu(self.conv(self.emb(tokens).transpose(1, 2))).transpose(1, 2)
        return self.out(h * mask.unsqueeze(-1))


def test_core_purifies_a_sequence_model_with_its_own_likelihood():
    torch.manual_seed(0)
    tokens = torch.randint(1, 12, (40, 6))
    mask = torch.ones(40, 6)
    targets = tokens % 3
    targets[:, -1] = -100  # padding position, ignored by the likelihood
    model = TokenTagger()
    likelihood = Categorical(ignore_index=-100)
    for method in ("fsft", "ngf", "sft"):
        result = purify(model, (tokens, mask), targets, likelihood, method_config(method, {"epochs": 8, "lr": 0.05}),
                        progress=False)
        assert result.record["val_loss"][-1] < result.record["val_loss"][0], method


def test_the_loop_purifies_a_backdoor_that_clean_fine_tuning_can_reach(tiny_params):
    """Blend's trigger shares features with clean data here: full fine-tuning (lr 0.1) removes it."""
    tiny_params["image"]["attacks"] = ["blend"]
    pipeline.prepare("image", tiny_params)
    pipeline.train_attack("image", tiny_params, "blend", progress=False)
    tiny_params["purify"] = {"overrides": {"ft": {"epochs": 10, "lr": 0.1, "augment": False}}}  # shifts change the class here
    record = pipeline.purify("image", tiny_params, "blend", "ft", progress=False)
    assert record["before"]["asr"] >= 0.9
    assert record["after"]["asr"] <= 0.1 and record["after"]["acc"] >= record["before"]["acc"] - 0.05, record


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="finding: at the papers' settings f-SFT and NGF leave the tiny backdoors "
                                       "intact (the trigger drives units clean data never activates); see README")
@pytest.mark.parametrize("method", ["fsft", "ngf"])
def test_fsft_and_ngf_lower_asr_on_a_backdoored_tiny_model(tiny_params, method):
    tiny_params["image"]["attacks"] = ["blend"]
    pipeline.prepare("image", tiny_params)
    pipeline.train_attack("image", tiny_params, "blend", progress=False)
    tiny_params["purify"] = {"common": {"epochs": 100}}
    record = pipeline.purify("image", tiny_params, "blend", method, progress=False)
    assert record["before"]["asr"] >= 0.9
    assert record["after"]["asr"] < record["before"]["asr"] - 0.2, record["after"]
    assert record["after"]["acc"] >= record["before"]["acc"] - 0.1


def test_anchor_penalty_is_the_fisher_weighted_distance_and_its_gradient():
    """L_r = sum_i F_i (theta_i - thetabar_i)^2 over every anchored tensor (a tensor without an anchor is
    left out), by brute force over scalars; dL_r/dtheta = 2 F (theta - thetabar)."""
    from smoothpurify.objective import anchor_penalty

    g = torch.Generator().manual_seed(0)
    params = {n: torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
              for n, shape in (("a", (3,)), ("b", (2, 4)), ("free", (5,)))}
    anchor = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items() if n != "free"}
    fisher = {n: torch.rand(a.shape, generator=g, dtype=torch.float64) for n, a in anchor.items()}
    value = anchor_penalty(params, fisher, anchor)
    brute = sum(float(fisher[n].flatten()[i]) * (float(params[n].detach().flatten()[i]) - float(anchor[n].flatten()[i])) ** 2
                for n in anchor for i in range(anchor[n].numel()))
    assert float(value.detach()) == pytest.approx(brute, rel=1e-12)
    value.backward()
    for n in anchor:
        torch.testing.assert_close(params[n].grad, 2 * fisher[n] * (params[n] - anchor[n]).detach())
    assert params["free"].grad is None
