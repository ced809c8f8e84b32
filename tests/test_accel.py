"""The device speed-ups (smoothpurify.accel): a CPU keeps the reference path; the GPU path (deferred
checks, channels_last, bf16 autocast), forced on the CPU here, computes the same purification."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import smoothpurify.purify as purify_module
import smoothpurify.training as training_module
from smoothpurify import SmoothPurifyError
from smoothpurify.accel import REFERENCE, Accel, resolve_accel
from smoothpurify.likelihood import Categorical
from smoothpurify.methods import method_config
from smoothpurify.objective import Objective
from smoothpurify.parametrize import prepare
from smoothpurify.purify import purify
from smoothpurify.spectral_trace import spectral_fisher_trace
from smoothpurify.training import train

# What "auto" gives on CUDA, on the CPU: every step of the GPU path except the kernels.
GPU_LIKE = Accel(device_type="cpu", channels_last=True, defer_checks=True)


class SmallCNN(nn.Module):
    classifier_name = "head"

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


def data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 4
    x[torch.arange(n), 0, 2 * y, 1] += 2.0
    return x, y


def shift(x, gen):
    return torch.roll(x, int(torch.randint(-1, 2, (1,), generator=gen)), dims=-1)


def run(method, accel=None, monkeypatch=None, x=None, **over):
    if accel is not None:
        monkeypatch.setattr(purify_module, "resolve_accel", lambda *a, **k: accel)
    xs, y = data()
    cfg = method_config(method, {"epochs": 2, "batch_size": 16, "iterations": None, **over})
    return purify(SmallCNN(), xs if x is None else x, y, Categorical(), cfg, progress=False, augment=shift)


def test_auto_is_the_reference_path_on_a_cpu_and_the_fast_one_on_cuda():
    assert resolve_accel("auto", "cpu") == REFERENCE
    assert resolve_accel("fp32", "cpu") == REFERENCE
    gpu = resolve_accel("auto", "cuda:0")
    assert gpu.autocast is None and gpu.channels_last and gpu.defer_checks and not gpu.compile
    assert resolve_accel("fp32", "cuda") == gpu
    assert resolve_accel("bf16", "cuda").autocast is torch.bfloat16
    assert resolve_accel("bf16", "cpu").autocast is torch.bfloat16
    with pytest.raises(SmoothPurifyError, match="precision 'half'"):
        resolve_accel("half", "cpu")


@pytest.mark.parametrize("method", ["ft", "ft-sam", "sft", "fsft", "ngf", "recommended"])
def test_the_gpu_path_purifies_as_the_reference_path(method, monkeypatch):
    """Deferred checks, device-side loss parts and channels_last change no number beyond float
    rounding; the model comes back in the default memory order (safetensors needs it)."""
    ref = run(method)
    fast = run(method, GPU_LIKE, monkeypatch)
    for (name, a), b in zip(ref.model.state_dict().items(), fast.model.state_dict().values()):
        assert b.is_contiguous(), name
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"{method}: {name}")
    assert fast.record["val_loss"] == pytest.approx(ref.record["val_loss"], rel=1e-4)
    for r, f in zip(ref.record["terms_per_epoch"], fast.record["terms_per_epoch"]):
        assert f == pytest.approx(r, rel=1e-4)
    assert fast.record["accel"]["channels_last"] and not ref.record["accel"]["channels_last"]


def test_a_deferred_check_still_stops_a_non_finite_loss_and_says_where(monkeypatch):
    x, _ = data()
    x[5] = float("nan")
    with pytest.raises(SmoothPurifyError, match=r"ft: loss became nan at epoch 1, step \d; lower the learning"):
        run("ft", GPU_LIKE, monkeypatch, x=x)


def test_bf16_autocast_keeps_the_fisher_trace_in_float32():
    """Under autocast the NLL is bfloat16-rounded, the trace term is not: it equals its float32 value."""
    x, y = data(16)
    tuned = prepare(SmallCNN(), "spectral")
    params = tuned.named_tuned()
    objective = Objective(Categorical(), trace_weight=1e-3, trace_every=1, trace_fn=spectral_fisher_trace)
    tuned.eval()
    _, plain = objective(tuned.model, params, x, y, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, mixed = objective(tuned.model, params, x, y, 0)
    assert mixed["trace_f"].dtype == torch.float32
    torch.testing.assert_close(mixed["trace_f"], plain["trace_f"], rtol=1e-5, atol=0)
    assert float(mixed["nll"]) != float(plain["nll"])  # the NLL did run in bfloat16


def test_bf16_purification_lands_near_the_float32_one(monkeypatch):
    ref = run("ft")
    mixed = run("ft", Accel(device_type="cpu", autocast=torch.bfloat16, defer_checks=True), monkeypatch)
    assert mixed.record["accel"]["autocast"] == "bfloat16"
    assert mixed.record["val_loss"][-1] == pytest.approx(ref.record["val_loss"][-1], rel=0.05)


def test_ngf_never_autocasts(monkeypatch):
    result = run("ngf", Accel(device_type="cpu", autocast=torch.bfloat16), monkeypatch)
    assert result.record["accel"]["autocast"] is None


def test_compile_wraps_the_forward_and_leaves_the_numbers(monkeypatch):
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    ref = run("ft")
    fast = run("ft", Accel(device_type="cpu", compile=True), monkeypatch)
    assert len(compiled) == 1 and fast.record["accel"]["compile"]
    assert fast.record["val_loss"] == ref.record["val_loss"]


def test_training_on_the_gpu_path_matches_and_returns_a_contiguous_model(monkeypatch):
    x, y = data()
    ref_model, fast_model = SmallCNN(), SmallCNN()
    ref = train(ref_model, x, y, Categorical(), epochs=2, lr=0.05, batch_size=16, progress=False)
    monkeypatch.setattr(training_module, "resolve_accel", lambda *a, **k: GPU_LIKE)
    fast = train(fast_model, x, y, Categorical(), epochs=2, lr=0.05, batch_size=16, progress=False)
    assert fast == pytest.approx(ref, rel=1e-4)
    for (name, a), b in zip(ref_model.state_dict().items(), fast_model.state_dict().values()):
        assert b.is_contiguous(), name
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    bad = x.clone()
    bad[0] = float("nan")
    with pytest.raises(SmoothPurifyError, match="loss became nan at epoch 1"):
        train(SmallCNN(), bad, y, Categorical(), epochs=1, lr=0.05, batch_size=16, progress=False)


@pytest.mark.parametrize("precision,autocast", [(None, None), ("bf16", "bfloat16")])
def test_params_precision_reaches_the_tuning_loop(precision, autocast):
    """params.yaml's ``purify.precision`` (default auto) is what the pipeline's runner purifies with;
    a wrong value fails when the runner is made, before any work."""
    from pipeline.stages import method_runner

    params = {"purify": {"common": {"epochs": 1, "batch_size": 16}, **({"precision": precision} if precision else {})}}
    _, run_method = method_runner(params, "ft")
    x, y = data()
    result = run_method(SmallCNN(), x, y, Categorical(), progress=False)
    assert result.record["accel"]["autocast"] == autocast
    assert result.record["accel"]["precision"] == (precision or "auto")
    with pytest.raises(SmoothPurifyError, match="precision 'half'"):
        method_runner({"purify": {"precision": "half"}}, "ft")
