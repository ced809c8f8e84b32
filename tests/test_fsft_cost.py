"""f-SFT's speed-ups (issue 18) leave the numbers as they were: the factored forward of spectral
layers against the plain parametrization, the one-pass trace step against the Objective's three
passes, and whole f-SFT runs, new path against the reference path, same seed."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smoothpurify.parametrize as PA
import smoothpurify.tuning_step as TS
from smoothpurify.fisher import fisher_trace
from smoothpurify.spectral_trace import spectral_trace_step
from smoothpurify.likelihood import Categorical
from smoothpurify.methods import method_config
from smoothpurify.parametrize import prepare, runs_factored
from smoothpurify.purify import purify

CE = Categorical()


class Net(nn.Module):
    """Conv2d with bias, a grouped strided conv with circular padding, a 1x1 conv, a Conv1d,
    frozen batch norm and a Linear head: every layer kind the factored forward handles."""

    classifier_name = "fc"

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=2, padding_mode="circular", bias=False)
        self.c3 = nn.Conv2d(6, 8, 1)
        self.c4 = nn.Conv1d(8, 5, 2)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = F.relu(self.c3(F.relu(self.c2(torch.relu(self.bn(self.c1(x)))))), inplace=True)
        return self.fc(self.c4(x.flatten(2)).mean(2))


def data(n=24, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 6, 6, generator=g, dtype=dtype)
    y = torch.arange(n) % 4
    x[torch.arange(n), 0, y, 0] += 2.0
    return x, y


def net(dtype=torch.float64):
    torch.manual_seed(0)
    model = Net().to(dtype)
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def factor_everything(monkeypatch):
    # Grouped convolutions do not pay on their own (their factors repeat per group); force them.
    monkeypatch.setattr(PA, "_factoring_pays", lambda layer, shift: True)


def shifted(model, factored, seed=1):
    tuned = prepare(model, "spectral", tune_bias=True, factored=factored)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_tuned().items():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        tuned.model.c2.parametrizations.weight[0].delta[-1] = -10.0  # a clipped singular value
    return tuned


def test_factored_forward_and_gradients_equal_the_parametrization(factor_everything):
    x, y = data()
    ref, new = shifted(net(), False), shifted(net(), True)
    assert all(runs_factored(m) for m in (new.model.c1, new.model.c2, new.model.c3, new.model.c4, new.model.fc))
    assert not any(runs_factored(m) for m in ref.model.modules())
    for t in (ref, new):
        t.train()
    out_ref, out_new = ref.model(x), new.model(x)
    torch.testing.assert_close(out_new, out_ref, rtol=1e-12, atol=1e-12)
    p_ref, p_new = ref.named_tuned(), new.named_tuned()
    assert list(p_ref) == list(p_new)
    g_ref = torch.autograd.grad(CE.nll(out_ref, y).mean(), list(p_ref.values()))
    g_new = torch.autograd.grad(CE.nll(out_new, y).mean(), list(p_new.values()))
    for a, b in zip(g_ref, g_new):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # evaluation reads the rebuilt W
        torch.testing.assert_close(new.model(x), out_ref.detach(), rtol=1e-12, atol=1e-12)
    # merging drops the instance forward; a deep copy keeps it bound to the copy
    merged = new.merge().eval()
    assert not any("forward" in m.__dict__ for m in merged.modules())
    new.eval()
    torch.testing.assert_close(merged(x), new.model(x), rtol=1e-12, atol=1e-12)
    clone = copy.deepcopy(new.model)
    assert clone.c1.forward.__self__ is clone.c1


def test_factored_forward_in_channels_last_order_equals_the_parametrization(factor_everything):
    """The GPU path's memory order: the product over channels as one matmul on NHWC views gives
    the same outputs and gradients, and keeps the activations channels_last."""
    x, y = data()
    ref, new = shifted(net(), False), shifted(net(), True)
    new.model.to(memory_format=torch.channels_last)
    for t in (ref, new):
        t.train()
    out_ref = ref.model(x)
    out_new = new.model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_new, out_ref, rtol=1e-12, atol=1e-12)
    h = new.model.c1(x.contiguous(memory_format=torch.channels_last))
    assert h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    g_ref = torch.autograd.grad(CE.nll(out_ref, y).mean(), list(ref.named_tuned().values()))
    g_new = torch.autograd.grad(CE.nll(out_new, y).mean(), list(new.named_tuned().values()))
    for a, b in zip(g_ref, g_new):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_factored_convs_keep_channels_last_after_a_one_channel_input(factor_everything):
    """A 1-channel image's layout is ambiguous, and filters rebuilt from Vh are NCHW: the layers after
    the first must still run channels_last when the model was put there (Fashion-MNIST on the GPU
    path), with the reference path's outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1)).double()
    x = torch.randn(5, 1, 7, 7, dtype=torch.float64)
    ref, new = prepare(copy.deepcopy(model), "spectral", factored=False), prepare(copy.deepcopy(model), "spectral")
    for t in (ref, new):
        for m in t.model.modules():
            if hasattr(m, "parametrizations"):
                m.parametrizations.weight[0].delta.data.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(1))
    new.model.to(memory_format=torch.channels_last)
    assert all(runs_factored(m) for m in new.model if isinstance(m, nn.Conv2d))
    h = x.contiguous(memory_format=torch.channels_last)
    layouts = []
    for layer in new.model:
        h = layer(h)
        layouts.append(h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous())
    assert layouts[2:] == [True, True, True]
    torch.testing.assert_close(h, ref.model(x), rtol=1e-12, atol=1e-12)


def test_factoring_rule_skips_layers_where_it_costs_more():
    tuned = prepare(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3)), "spectral")
    assert not runs_factored(tuned.model[0]) and runs_factored(tuned.model[1])
    assert not any(runs_factored(m) for m in prepare(nn.Conv2d(8, 8, 3), "spectral", factored=False).model.modules())


@pytest.mark.parametrize("factored", [False, True])
def test_one_pass_trace_step_equals_the_objective_passes(factor_everything, factored):
    x, y = data()
    tuned = shifted(net(), factored)
    tuned.train()
    params = tuned.named_tuned()
    names, tensors = list(params), list(params.values())
    nll, trace, g_nll, g_trace = spectral_trace_step(tuned.model, x, y, CE, params)
    # reference: the NLL's own forward and backward, the vmap trace (per-sample gradients) and its gradient
    ref_nll = CE.nll(tuned.model(x), y).mean()
    ref_trace = fisher_trace(tuned.model, x, y, CE, params)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-12, atol=0)
    torch.testing.assert_close(trace, ref_trace, rtol=1e-10, atol=0)
    for n, a, b in zip(names, torch.autograd.grad(ref_nll, tensors), torch.autograd.grad(ref_trace, tensors)):
        torch.testing.assert_close(g_nll[n], a, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(g_trace[n], b, rtol=1e-9, atol=1e-12)


def test_one_pass_trace_step_declines_batch_statistics_and_dropout():
    x, y = data()
    tuned = prepare(net(), "spectral", tune_norm=True)  # BN tuned: normalises over the batch
    tuned.train()
    assert spectral_trace_step(tuned.model, x, y, CE, tuned.named_tuned()) is None
    tuned = prepare(nn.Sequential(nn.Flatten(), nn.Linear(108, 8), nn.Dropout(0.5), nn.Linear(8, 4)).double(),
                    "spectral")
    tuned.train()
    assert spectral_trace_step(tuned.model, x, y, CE, tuned.named_tuned()) is None


def run(model, x, y, new: bool, monkeypatch, **overrides):
    monkeypatch.setattr(TS, "FUSED_SPECTRAL_TRACE", new)
    monkeypatch.setattr(PA, "FACTORED", new)
    cfg = method_config("fsft", {"epochs": 3, "batch_size": 8, "trace_every": 2, "lr_step": 2, **overrides})
    return purify(model, x, y, CE, cfg, seed=3, progress=False)


@pytest.mark.parametrize("overrides", [{}, {"tune_bias": True, "trace_step_bound": False, "max_grad_norm": 0.5},
                                       {"tune_norm": True}, {"anchor_weight": 0.0, "trace_weight": 0.05}])
def test_fsft_run_equals_reference_path(factor_everything, monkeypatch, overrides):
    """Same seed, the whole f-SFT loop: the factored forward and the one-pass trace step (where
    the model allows it; tune_norm trains BN and falls back) against the plain parametrization and
    Objective; the tuned shifts, the purified model's outputs and the recorded terms agree."""
    x, y = data()
    ref = run(net(), x, y, False, monkeypatch, **overrides)
    new = run(net(), x, y, True, monkeypatch, **overrides)
    assert ref.record["steps"] == new.record["steps"] == 9
    sd_ref, sd_new = ref.model.state_dict(), new.model.state_dict()
    assert list(sd_ref) == list(sd_new)
    for k in sd_ref:
        if sd_ref[k].is_floating_point():
            torch.testing.assert_close(sd_new[k], sd_ref[k], rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(new.model.eval()(x), ref.model.eval()(x), rtol=1e-9, atol=1e-12)
    for a, b in zip(ref.record["terms_per_epoch"], new.record["terms_per_epoch"]):
        assert list(a) == list(b)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12)
    # and the shifts really moved (not a trivially equal pair)
    assert max(float(v.abs().max()) for k, v in sd_new.items() if v.is_floating_point()) > 0
    assert ref.record["terms_per_epoch"][0].get("trace_f", 0) > 0


def test_fsft_run_float32_within_tolerance(monkeypatch):
    x, y = data(dtype=torch.float32)
    ref = run(net(torch.float32), x, y, False, monkeypatch)
    new = run(net(torch.float32), x, y, True, monkeypatch)
    for k, v in ref.model.state_dict().items():
        if v.is_floating_point():
            w = new.model.state_dict()[k]
            assert float((w - v).norm() / v.norm().clamp_min(1e-30)) < 1e-5, k
    with torch.no_grad():
        a, b = ref.model.eval()(x), new.model.eval()(x)
    assert float((a - b).norm() / a.norm()) < 1e-5
