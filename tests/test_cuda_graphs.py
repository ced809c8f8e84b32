"""CUDA graphs in the tuning loop (smoothpurify.cuda_graphs): only on CUDA, and where they run they
compute what the eager loop computes. The replay tests need a GPU and are skipped without one; the
device-side step bound the captured trace step uses is checked against the host's on the CPU."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import smoothpurify.accel as accel_module
import smoothpurify.cuda_graphs as graphs_module
from smoothpurify.accel import resolve_accel
from smoothpurify.cuda_graphs import GraphedRunner
from smoothpurify.likelihood import Categorical
from smoothpurify.methods import method_config
from smoothpurify.objective import Objective, anchor_penalty, anchor_penalty_and_grad
from smoothpurify.parametrize import prepare
from smoothpurify.purify import purify
from smoothpurify.spectral_trace import spectral_fisher_trace
from smoothpurify.tuning_step import fused_trace, plain_step
from tests.test_accel import SmallCNN

CE = Categorical()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def data(n=40, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.arange(n) % 4
    x[torch.arange(n), 0, y, y] += 3.0
    return x, y


def test_graphs_are_part_of_auto_on_cuda_only(monkeypatch):
    assert resolve_accel("auto", "cuda").graphs and resolve_accel("fp32", "cuda").graphs
    assert not resolve_accel("auto", "cpu").graphs
    assert not resolve_accel("bf16", "cuda").graphs            # autocast: not captured
    assert not resolve_accel("auto", "cuda", compile=True).graphs
    monkeypatch.setenv("SMOOTHPURIFY_CUDA_GRAPHS", "0")  # the user's switch
    assert not resolve_accel("auto", "cuda").graphs
    monkeypatch.setenv("SMOOTHPURIFY_CUDA_GRAPHS", "1")
    assert resolve_accel("auto", "cuda").graphs
    monkeypatch.setattr(accel_module, "CUDA_GRAPHS", False)
    assert not resolve_accel("auto", "cuda").graphs


def test_graphed_runner_runs_the_module_eagerly_off_cuda():
    model = SmallCNN().double()
    x, _ = data()
    runner = GraphedRunner(model)
    out = runner(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    out.sum().backward()
    assert runner.captures == 0 and model.conv1.weight.grad is not None


@pytest.mark.parametrize("trace_weight, bound_active", [(5.0, True), (1e-9, False)])
def test_device_side_step_bound_equals_the_hosts(trace_weight, bound_active):
    """What the captured trace step computes (the bound kept on the device) equals the eager step's."""
    x, y = data()
    tuned = prepare(SmallCNN().double(), "spectral")
    tuned.train()
    params = tuned.named_tuned()
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))
    obj = Objective(CE, trace_weight=trace_weight, trace_every=1, trace_step_bound=True,
                    trace_fn=spectral_fisher_trace, anchor_weight=2.0)
    obj.fisher_diag = {n: torch.rand_like(p) for n, p in params.items()}
    obj.anchor = {n: torch.zeros_like(p) for n, p in params.items()}
    host_total, host_parts, host_grads = fused_trace(obj, tuned.model, params, x, y)
    dev_total, dev_parts, dev_grads = fused_trace(obj, tuned.model, params, x, y, on_device=True)
    assert isinstance(dev_parts["trace_scale"], torch.Tensor) and isinstance(host_parts["trace_scale"], float)
    assert (host_parts["trace_scale"] < 1.0) == bound_active
    assert float(dev_parts["trace_scale"]) == pytest.approx(host_parts["trace_scale"], rel=1e-12)
    torch.testing.assert_close(dev_total, host_total, rtol=1e-12, atol=0)
    for n in params:
        torch.testing.assert_close(dev_grads[n], host_grads[n], rtol=1e-10, atol=1e-14)


def test_the_anchor_in_closed_form_equals_its_autograd():
    g = torch.Generator().manual_seed(4)
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 2, 3)}
    params = {n: torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for n, s in shapes.items()}
    fisher = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items() if n != "c"}
    anchor = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items() if n != "c"}
    penalty, grads = anchor_penalty_and_grad(params, fisher, anchor, 3.0)
    ref = anchor_penalty(params, fisher, anchor)
    ref_grads = torch.autograd.grad(1.5 * ref, [params["a"], params["b"]])
    torch.testing.assert_close(penalty, ref.detach(), rtol=1e-13, atol=0)
    assert set(grads) == {"a", "b"} and not penalty.requires_grad
    for n, r in zip(("a", "b"), ref_grads):
        torch.testing.assert_close(grads[n], r, rtol=1e-13, atol=0)


def test_plain_step_gives_the_gradients_backward_gives():
    """The function a whole-step graph captures: loss, parts and gradients as the eager closure's
    ``backward()`` leaves them, None for a parameter the loss does not use."""
    x, y = data()
    model = SmallCNN().double()
    model.unused = nn.Linear(2, 2).double()
    tuned = prepare(model, "full")
    tuned.train()
    params = tuned.named_tuned()
    obj = Objective(CE, trace_weight=1e-3, trace_every=10, trace_fn=spectral_fisher_trace, anchor_weight=3.0)
    anchored = {n: p for n, p in params.items() if not n.startswith("unused.")}
    obj.fisher_diag = {n: torch.rand_like(p) for n, p in anchored.items()}
    obj.anchor = {n: p.detach() + 0.1 for n, p in anchored.items()}
    state = copy.deepcopy(tuned.model.state_dict())
    loss, parts, grads = plain_step(obj, tuned.model, params, x, y)
    tuned.model.load_state_dict(state)  # the batch-norm statistics one training forward moved
    dev_loss, dev_parts, dev_grads = plain_step(obj, tuned.model, params, x, y, on_device=True)
    tuned.model.load_state_dict(state)
    torch.testing.assert_close(dev_loss, loss, rtol=1e-12, atol=0)  # the anchor in closed form
    torch.testing.assert_close(dev_parts["anchor"], parts["anchor"], rtol=1e-12, atol=0)
    assert list(dev_parts) == list(parts)
    for n in params:
        assert (dev_grads[n] is None) == (grads[n] is None)
        if grads[n] is not None:
            torch.testing.assert_close(dev_grads[n], grads[n], rtol=1e-12, atol=1e-15)
    ref_loss, ref_parts = obj(tuned.model, params, x, y, 1)
    ref_loss.backward()
    assert set(parts) == set(ref_parts) == {"nll", "anchor"}
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=0)
    for n, p in params.items():
        if n.startswith("unused."):
            assert grads[n] is None and p.grad is None
        else:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=1e-15)


def _purify(method: str, graphs: bool, monkeypatch, whole: bool = True, **overrides):
    monkeypatch.setattr(accel_module, "CUDA_GRAPHS", graphs)
    monkeypatch.setattr(graphs_module, "CAPTURE_WHOLE_STEP", whole)
    x, y = data(dtype=torch.float32)
    cfg = method_config(method, {"epochs": 4, "batch_size": 16, "trace_every": 3, "augment": False, **overrides})
    return purify(SmallCNN(), x, y, CE, cfg, seed=2, device="cuda", progress=False)


@cuda
@pytest.mark.parametrize("method, whole", [(m, w) for m in ("ft", "ft-sam", "fsft", "sft") for w in (True, False)]
                         + [("recommended", True)])
def test_a_graphed_run_equals_the_eager_run_on_the_gpu(method, whole, monkeypatch):
    """Same seed, the whole loop on the GPU with graphs and without: 40 samples in batches of 16 give
    two shapes (both captured), ft trains batch norm (the capture's warm-up must not move its
    statistics), f-SFT's trace steps replay the captured fused step; steps captured whole, or only
    the model's forward and backward (``whole`` False, and ``recommended``, whose overlay is drawn
    on the host)."""
    eager = _purify(method, False, monkeypatch, whole)
    graphed = _purify(method, True, monkeypatch, whole)
    assert eager.record["accel"]["cuda_graphs"] == 0
    assert graphed.record["accel"]["cuda_graphs"] >= 2
    sd_e, sd_g = eager.model.state_dict(), graphed.model.state_dict()
    for k in sd_e:
        if sd_e[k].is_floating_point():
            torch.testing.assert_close(sd_g[k], sd_e[k], rtol=1e-3, atol=1e-4, msg=k)
    for a, b in zip(eager.record["terms_per_epoch"], graphed.record["terms_per_epoch"]):
        assert list(a) == list(b)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), k


@cuda
def test_graphed_runner_restores_what_its_warm_up_changed():
    model = SmallCNN().cuda().train()
    before = copy.deepcopy(model.state_dict())
    x, _ = data(dtype=torch.float32)
    runner = GraphedRunner(model)
    runner(x.cuda()).sum().backward()  # capture (warm-up passes in train mode), then one real step
    eager = SmallCNN().cuda().train()
    eager.load_state_dict(before)
    eager(x.cuda())
    for k, v in model.state_dict().items():  # statistics moved by exactly one batch, as eagerly
        torch.testing.assert_close(v, eager.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)
    assert runner.captures == 1


def test_cudnn_benchmark_is_scoped_to_the_step(monkeypatch):
    monkeypatch.setattr(accel_module, "CUDNN_BENCHMARK", True)
    acc = resolve_accel("auto", "cuda")
    assert acc.cudnn_benchmark and not resolve_accel("auto", "cpu").cudnn_benchmark
    before = torch.backends.cudnn.benchmark
    with acc.step_context():
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before
