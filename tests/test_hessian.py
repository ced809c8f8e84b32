"""smoothpurify.hessian against a Hessian formed densely on a 67-parameter MLP (float64)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.hessian import (HessianOperator, _fisher_trace_loop, analyze, fisher_trace_value,
                                  hessian_trace, spectral_density, top_eigenvalues)
from smoothpurify.likelihood import Categorical


@pytest.fixture(scope="module")
def setup(one_thread):
    # Seed 1: the three eigenvalues of largest magnitude (0.876, 0.598, 0.435, then 0.308) are
    # positive and separated, so power iteration converges in a few hundred HVPs.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    lik = Categorical()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        chunks = dict(zip(names, (c.view(s) for c, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        model.eval()  # dropout off, as in the module under test
        return lik.nll(torch.func.functional_call(model, chunks, (x,)), y).mean()

    hess = torch.autograd.functional.hessian(loss, flat0)
    model.train()  # the module must leave this flag as it found it
    eig = torch.linalg.eigvalsh(hess)
    return model, x, y, lik, hess, eig


def test_operator_matches_dense_hessian(setup):
    model, x, y, lik, hess, _ = setup
    v = torch.randn(hess.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with HessianOperator(model, x, y, lik) as op:
        hv = op(v)
        assert op.dim == hess.shape[0]
    torch.testing.assert_close(hv, hess @ v, rtol=1e-10, atol=1e-12)
    assert model.training
    assert all(p.requires_grad for p in model.parameters())


def test_power_iteration_top_eigenvalues_with_deflation(setup):
    model, x, y, lik, _, eig = setup
    by_magnitude = eig[eig.abs().argsort(descending=True)]
    values, n_hvp = top_eigenvalues(model, x, y, lik, k=3, max_iter=2000, tol=1e-9,
                                    generator=torch.Generator().manual_seed(0))
    assert len(values) == 3 and n_hvp > 3
    for got, want in zip(values, by_magnitude[:3].tolist()):
        assert abs(got - want) <= 1e-3 * abs(want), (values, by_magnitude[:3])
    assert values[0] == pytest.approx(float(eig.max()), rel=1e-3)  # here also the largest algebraic
    assert model.training


def test_hutchinson_within_three_standard_errors(setup):
    model, x, y, lik, hess, _ = setup
    out = hessian_trace(model, x, y, lik, n_probes=100, generator=torch.Generator().manual_seed(0))
    exact = float(torch.trace(hess))
    assert out["n_hvp"] == 100 and out["stderr"] > 0
    assert abs(out["mean"] - exact) <= 3 * out["stderr"], (out, exact)
    early = hessian_trace(model, x, y, lik, n_probes=1000, tol=0.2, generator=torch.Generator().manual_seed(0))
    assert 3 <= early["n_hvp"] < 1000 and early["stderr"] <= 0.2 * abs(early["mean"])


def test_slq_density_normalised_and_covers_extremes(setup):
    model, x, y, lik, _, eig = setup
    out = spectral_density(model, x, y, lik, n_probes=3, lanczos_steps=80, grid=2000,
                           generator=torch.Generator().manual_seed(0))
    assert float(torch.trapezoid(out["density"], out["grid"])) == pytest.approx(1.0, abs=1e-9)
    assert float(out["weights"].sum()) == pytest.approx(1.0, abs=1e-9)
    assert (out["density"] >= 0).all()
    width = float(eig.max() - eig.min())
    assert abs(float(out["nodes"].max()) - float(eig.max())) <= 1e-3 * width
    assert abs(float(out["nodes"].min()) - float(eig.min())) <= 1e-3 * width
    # 67 parameters: the Lanczos runs stop at the dimension, so 3 * 67 nodes at most.
    assert out["nodes"].numel() <= 3 * 67 and out["n_hvp"] <= 3 * 67
    # The quadrature is exact for low-degree polynomials: its mean estimates Tr(H)/N.
    mean_node = float((out["nodes"] * out["weights"]).sum())
    assert mean_node == pytest.approx(float(eig.mean()), abs=0.05)


def test_slq_with_few_steps_and_given_grid(setup):
    model, x, y, lik, _, eig = setup
    grid = torch.linspace(-1.0, 1.5, 501, dtype=torch.float64)
    out = spectral_density(model, x, y, lik, n_probes=2, lanczos_steps=10, grid=grid, sigma=0.05,
                           generator=torch.Generator().manual_seed(1))
    assert out["nodes"].numel() == 20 and out["n_hvp"] == 20
    assert torch.equal(out["grid"], grid)
    assert float(torch.trapezoid(out["density"], grid)) == pytest.approx(1.0, abs=1e-9)
    assert float(out["nodes"].max()) <= float(eig.max()) + 1e-9  # Ritz values interlace


def test_subset_of_parameters_and_frozen_backbone(setup):
    model, x, y, lik, hess, _ = setup
    head = model[3]
    params = {"3.weight": head.weight, "3.bias": head.bias}
    n_head = head.weight.numel() + head.bias.numel()
    block = hess[-n_head:, -n_head:]  # the head's parameters come last in the flat order
    for p in model[0].parameters():
        p.requires_grad_(False)
    try:
        values, _ = top_eigenvalues(model, x, y, lik, params=params, k=1, max_iter=2000, tol=1e-10,
                                    generator=torch.Generator().manual_seed(0))
        block_eig = torch.linalg.eigvalsh(block)
        assert values[0] == pytest.approx(float(block_eig.abs().max()), rel=1e-3)
        assert not model[0].weight.requires_grad and head.weight.requires_grad
    finally:
        for p in model[0].parameters():
            p.requires_grad_(True)


def test_fisher_trace_and_analyze(setup):
    model, x, y, lik, hess, eig = setup
    # Brute force: (1/B) sum_j ||grad nll_j||^2 with the model in eval mode.
    model.eval()
    want = 0.0
    for j in range(x.shape[0]):
        g = torch.autograd.grad(lik.nll(model(x[j:j + 1]), y[j:j + 1]).sum(), list(model.parameters()))
        want += sum(float(t.pow(2).sum()) for t in g)
    want /= x.shape[0]
    model.train()
    assert fisher_trace_value(model, x, y, lik) == pytest.approx(want, rel=1e-8)
    model.eval()  # the fallback loop, used while smoothpurify.fisher is absent
    assert _fisher_trace_loop(model, x, y, lik, None) == pytest.approx(want, rel=1e-10)
    model.train()
    assert model.training
    out = analyze(model, x, y, lik, k=2, max_iter=2000, tol=1e-9, n_probes=50,
                  generator=torch.Generator().manual_seed(0))
    assert set(out) == {"lambda_max", "top_k", "trace_h", "trace_h_stderr", "trace_f", "n_hvp", "seconds"}
    assert out["lambda_max"] == pytest.approx(float(eig.max()), rel=1e-3)
    assert len(out["top_k"]) == 2 and out["n_hvp"] > 50
    assert abs(out["trace_h"] - float(torch.trace(hess))) <= 3 * out["trace_h_stderr"]
    assert out["trace_f"] == pytest.approx(want, rel=1e-8)
    assert analyze(model, x, y, lik, n_probes=2, fisher=False)["trace_f"] is None


def test_token_outputs_and_tuple_inputs():
    # A model taking a tuple of tensors with per-token outputs: the same code path as translation.
    class TwoInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5)

        def forward(self, src, tgt):
            return self.out(self.emb(src) + self.emb(tgt))

    torch.manual_seed(0)
    model = TwoInput().double()
    src, tgt = torch.randint(0, 5, (4, 6)), torch.randint(0, 5, (4, 6))
    out = analyze(model, (src, tgt), tgt, Categorical(), n_probes=5, max_iter=20)
    assert out["trace_f"] > 0 and out["lambda_max"] > 0


def test_no_parameters_is_a_clear_error():
    model = nn.Linear(2, 2)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(SmoothPurifyError, match="no parameters"):
        hessian_trace(model, torch.randn(3, 2), torch.tensor([0, 1, 0]), Categorical(), n_probes=2)
