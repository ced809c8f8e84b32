"""smoothpurify.optim: natural gradient (exact and K-FAC) and SAM against hand/dense computations."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from smoothpurify import SmoothPurifyError
from smoothpurify.likelihood import Categorical
from smoothpurify.optim import SAM, NaturalGradient, make_optimizer

LIK = Categorical()


def _classifier(n_in=5, n_out=3, batch=8, seed=0, dtype=torch.float64, bias=True):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    x = torch.randn(batch, n_in, dtype=dtype)
    y = torch.randint(0, n_out, (batch,))
    return layer, x, y


def _per_sample_grads(layer, x, y):
    """[B, *p.shape] per parameter, by a plain loop over samples."""
    params = list(layer.parameters())
    rows = [torch.autograd.grad(LIK.nll(layer(x[j:j + 1]), y[j:j + 1]).sum(), params) for j in range(len(y))]
    return [torch.stack([r[i] for r in rows]) for i in range(len(params))]


def _objective_backward(layer, x, y, anchor):
    """CE + a diagonal anchor (NGF eq. 3 shape), so p.grad is not the mean per-sample gradient."""
    layer.zero_grad()
    loss = LIK.nll(layer(x), y).mean()
    loss = loss + 0.5 * sum(((p - a) ** 2 * (i + 1.0)).sum() for i, (p, a) in enumerate(zip(layer.parameters(), anchor)))
    loss.backward()


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("batch", [8, 40])  # B < N (Woodbury path) and B > N (dense path); N = 18
def test_exact_step_is_damped_fisher_solve(batch):
    layer, x, y = _classifier(batch=batch)
    anchor = [p.detach() + 0.1 for p in layer.parameters()]
    before = _flat([p.detach().clone() for p in layer.parameters()])
    opt = NaturalGradient(layer.parameters(), lr=0.3, damping=1e-3, solver="exact")
    psg = _per_sample_grads(layer, x, y)
    _objective_backward(layer, x, y, anchor)
    grad = _flat([p.grad for p in layer.parameters()])
    opt.update_fisher(psg)
    opt.step()

    flat = torch.cat([g.reshape(batch, -1) for g in psg], dim=1)
    fisher = flat.T @ flat / batch
    want = before - 0.3 * torch.linalg.solve(fisher + 1e-3 * torch.eye(fisher.shape[0], dtype=torch.float64), grad)
    torch.testing.assert_close(_flat(layer.parameters()).detach(), want, rtol=1e-9, atol=1e-11)


def test_exact_step_float32_close_to_float64():
    layer64, x, y = _classifier(n_in=20, n_out=10, batch=16)
    layer32 = nn.Linear(20, 10).float()
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    for layer, xx in ((layer64, x), (layer32, x.float())):
        opt = NaturalGradient(layer.parameters(), lr=1.0, damping=1e-4)
        opt.update_fisher(_per_sample_grads(layer, xx, y))
        _objective_backward(layer, xx, y, [p.detach() + 0.1 for p in layer.parameters()])
        opt.step()
    torch.testing.assert_close(layer32.weight.double(), layer64.weight.detach(), rtol=1e-3, atol=1e-4)


def _kfac_inputs(layer, x, y):
    """Layer inputs and g_j = d l_j / d z_j for every sample's own loss (one backward of the sum)."""
    z = layer(x)
    gz = torch.autograd.grad(LIK.nll(z, y).sum(), z)[0]
    return x, gz


def _kfac_to_concat(n_out, n_in):
    """Index map: position in the concatenated [W.flatten(), b] order -> position in vec_row([W | b])."""
    idx = [o * (n_in + 1) + i for o in range(n_out) for i in range(n_in)]
    return torch.tensor(idx + [o * (n_in + 1) + n_in for o in range(n_out)])


@pytest.mark.parametrize("same_inputs", [False, True])
def test_kfac_equals_exact_fisher_when_factorisation_is_exact(same_inputs):
    # One sample, or several sharing one input (E[gg^T (x) aa^T] = E[gg^T] (x) aa^T): K-FAC is exact.
    n_in, n_out = 4, 3
    layer, x, y = _classifier(n_in, n_out, batch=6 if same_inputs else 1)
    if same_inputs:
        x = x[:1].expand(6, n_in).clone()
        y = torch.arange(6) % n_out
    opt = NaturalGradient(layer.parameters(), lr=0.5, damping=1e-2, solver="kfac")
    a, gz = _kfac_inputs(layer, x, y)
    opt.update_kfac(a, gz, has_bias=True)
    state = opt.state[layer.weight]
    perm = _kfac_to_concat(n_out, n_in)
    kron = torch.kron(state["kfac_G"], state["kfac_A"])[perm][:, perm]
    psg = _per_sample_grads(layer, x, y)
    flat = torch.cat([g.reshape(len(y), -1) for g in psg], dim=1)
    torch.testing.assert_close(kron, flat.T @ flat / len(y), rtol=1e-10, atol=1e-12)

    before = [p.detach().clone() for p in layer.parameters()]
    _objective_backward(layer, x, y, [p.detach() + 0.1 for p in layer.parameters()])
    grad_aug = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
    root = math.sqrt(1e-2)
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    dense = torch.kron(state["kfac_G"] + root * eye(n_out), state["kfac_A"] + root * eye(n_in + 1))
    want = torch.linalg.solve(dense, grad_aug.reshape(-1)).reshape(n_out, n_in + 1)
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), before[0] - 0.5 * want[:, :-1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.bias.detach(), before[1] - 0.5 * want[:, -1], rtol=1e-9, atol=1e-12)


def test_kfac_without_bias_and_auto_solver():
    layer, x, y = _classifier(6, 4, batch=10, bias=False)
    opt = NaturalGradient(layer.parameters(), solver="auto", max_exact=10)  # 24 > 10 -> K-FAC
    assert opt.solvers == ["kfac"]
    with pytest.raises(RuntimeError, match="before update_kfac"):
        _objective_backward(layer, x, y, [layer.weight.detach()])
        opt.step()
    with pytest.raises(SmoothPurifyError, match="has_bias"):
        opt.update_kfac(*_kfac_inputs(layer, x, y), has_bias=True)
    opt.update_kfac(*_kfac_inputs(layer, x, y), has_bias=False)
    before = layer.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, layer.weight.detach())
    assert NaturalGradient(layer.parameters(), max_exact=24).solvers == ["exact"]


def test_natural_gradient_beats_sgd_on_ill_conditioned_logistic_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 0.03], dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(x[:, 0] + 60.0 * x[:, 1]), generator=g).long()

    def losses(kind, steps, lr=0.3):
        layer = nn.Linear(2, 2).double()
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        opt = (NaturalGradient(layer.parameters(), lr=lr, damping=1e-4) if kind == "ng"
               else make_optimizer("sgd", layer.parameters(), lr=lr))
        out = []
        for _ in range(steps):
            z = layer(x)
            loss = LIK.nll(z, y).mean()
            out.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            if kind == "ng":  # softmax regression: per-sample grads are (p - onehot) x^T and (p - onehot)
                gz = F.softmax(z.detach(), dim=1) - F.one_hot(y, 2)
                opt.update_fisher([gz[:, :, None] * x[:, None, :], gz])
            opt.step()
        return out

    ng, sgd = losses("ng", 30), losses("sgd", 300)
    assert all(b <= a + 1e-12 for a, b in zip(sgd, sgd[1:]))  # SGD is stable at this lr, just slow
    reached = next(i for i, v in enumerate(ng) if v < sgd[-1])
    assert reached <= 10, (reached, ng[:12], sgd[-1])
    assert ng[-1] < sgd[-1] - 0.05


def test_momentum_and_fisher_decay():
    layer, x, y = _classifier(batch=30)
    opt = NaturalGradient(layer.parameters(), lr=0.1, damping=1e-2, momentum=0.5, fisher_decay=0.5)
    psg = _per_sample_grads(layer, x, y)
    opt.update_fisher(psg)
    first = opt.state[layer.weight]["fisher"].clone()
    opt.update_fisher([2 * g for g in psg])  # 4 F, averaged with F: 2.5 F
    torch.testing.assert_close(opt.state[layer.weight]["fisher"], 2.5 * first)

    anchor = [p.detach().clone() for p in layer.parameters()]
    _objective_backward(layer, x, y, anchor)
    grads = [p.grad.clone() for p in layer.parameters()]
    w0 = layer.weight.detach().clone()
    opt.step()
    w1 = layer.weight.detach().clone()
    for p, gr in zip(layer.parameters(), grads):  # same gradient again: displacement (1 + momentum) x
        p.grad = gr.clone()
    opt.step()
    torch.testing.assert_close(layer.weight.detach() - w1, 1.5 * (w1 - w0), rtol=1e-9, atol=1e-12)


def test_natural_gradient_errors():
    layer, x, y = _classifier()
    opt = NaturalGradient(layer.parameters(), solver="exact")
    _objective_backward(layer, x, y, [p.detach() for p in layer.parameters()])
    with pytest.raises(RuntimeError, match="before update_fisher"):
        opt.step()
    with pytest.raises(SmoothPurifyError, match="per-sample gradients for 2 parameters"):
        opt.update_fisher([torch.zeros(3, 3, 5)])
    with pytest.raises(SmoothPurifyError, match="does not match"):
        opt.update_fisher([torch.zeros(3, 3, 5), torch.zeros(4, 3)])
    with pytest.raises(SmoothPurifyError, match="unknown natural-gradient solver"):
        NaturalGradient(layer.parameters(), solver="newton")
    with pytest.raises(SmoothPurifyError, match="one linear layer"):
        NaturalGradient(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).parameters(), solver="kfac")
    with pytest.raises(SmoothPurifyError, match="update_fisher"):
        opt.update_kfac(x, torch.zeros(8, 3), has_bias=True)
    bad = NaturalGradient(layer.parameters(), damping=1e-3, solver="exact")
    bad.update_fisher([torch.full((40, 3, 5), float("nan")), torch.zeros(40, 3)])
    with pytest.raises(SmoothPurifyError, match="not positive definite"):
        bad.step()


# -- SAM ------------------------------------------------------------------------------------------

def _quadratic():
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    w = nn.Parameter(torch.tensor([0.5, 1.5], dtype=torch.float64))
    return a, b, w, lambda v: 0.5 * v @ a @ v - b @ v


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_second_gradient_at_perturbed_point(adaptive):
    a, b, w, loss_fn = _quadratic()
    w0 = w.detach().clone()
    rho, lr = 0.1, 0.2
    opt = SAM([w], torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)
    seen = []

    def closure():
        opt.zero_grad()
        loss = loss_fn(w)
        loss.backward()
        seen.append(w.detach().clone())
        return loss

    opt.step(closure)  # both evaluations happen inside the step: at w, then at w + e

    torch.testing.assert_close(seen[0], w0)
    g0 = a @ w0 - b
    if adaptive:  # ASAM: e = rho T^2 g / ||T g||, T = |w|
        e = rho * w0 ** 2 * g0 / torch.linalg.vector_norm(w0.abs() * g0)
    else:
        e = rho * g0 / g0.norm()
    torch.testing.assert_close(seen[1], w0 + e)  # the second gradient is taken at w + e
    g1 = a @ (w0 + e) - b
    torch.testing.assert_close(w.detach(), w0 - lr * g1)
    assert "sam_w" not in opt.state[w]


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturbs_several_tensors_by_one_global_norm(adaptive):
    """The multi-tensor path: e is scaled by the norm over every tensor with a gradient (both groups),
    a parameter without a gradient stays where it is, and every tensor comes back to w."""
    g = torch.Generator().manual_seed(0)
    ws = [nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64)),
          nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64)),
          nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))]
    frozen = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))
    w0 = [w.detach().clone() for w in ws]
    coef = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in ws]
    loss_fn = lambda: sum((c * w ** 3).sum() for c, w in zip(coef, ws))  # noqa: E731
    opt = SAM([{"params": ws[:2]}, {"params": [ws[2], frozen], "rho": 0.3}], torch.optim.SGD, rho=0.3,
              adaptive=adaptive, lr=0.0)
    seen = []

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        seen.append([w.detach().clone() for w in ws])
        return loss

    opt.step(closure)
    grads = [3 * c * w ** 2 for c, w in zip(coef, w0)]
    scaled = [w.abs() * gr if adaptive else gr for w, gr in zip(w0, grads)]
    norm = torch.sqrt(sum((s ** 2).sum() for s in scaled))
    for w, gr, at in zip(w0, grads, seen[1]):
        e = 0.3 * (w ** 2 if adaptive else 1) * gr / norm
        torch.testing.assert_close(at, w + e)
    for w, start in zip(ws, w0):  # lr 0: back at w exactly
        assert torch.equal(w.detach(), start)
    assert frozen.grad is None and all("sam_w" not in opt.state[w] for w in ws)


def test_sam_step_without_initial_gradient_and_with_adam():
    _, _, w, loss_fn = _quadratic()
    opt = make_optimizer("sam", [w], base="adam", rho=0.05, lr=0.01)
    assert isinstance(opt.base_optimizer, torch.optim.Adam)
    calls = []

    def closure():
        opt.zero_grad()
        loss = loss_fn(w)
        loss.backward()
        calls.append(1)
        return loss

    start = float(loss_fn(w).detach())
    for _ in range(50):
        opt.zero_grad()  # no gradient present: step() evaluates the closure at w first
        opt.step(closure)
    assert len(calls) == 100 and float(loss_fn(w).detach()) < start
    state = opt.state_dict()
    again = make_optimizer("sam", [w], base="adam", rho=0.05, lr=0.01)
    again.load_state_dict(state)
    assert again.base_optimizer.state is again.state and "exp_avg" in again.state[w]
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_sam_matches_pytorch_optimizer_when_installed():
    pto = pytest.importorskip("pytorch_optimizer")
    results = []
    for cls in (SAM, pto.SAM):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        opt = cls(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

        def closure():
            opt.zero_grad()
            loss = LIK.nll(net(x), y).mean()
            loss.backward()
            return loss

        for _ in range(5):
            closure()
            opt.step(closure)
        results.append(_flat(net.parameters()).detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_make_optimizer():
    layer = nn.Linear(2, 2)
    assert isinstance(make_optimizer("sgd", layer.parameters(), lr=0.1), torch.optim.SGD)
    assert isinstance(make_optimizer("adam", layer.parameters(), lr=0.1), torch.optim.Adam)
    assert isinstance(make_optimizer("natural-gradient", layer.parameters(), lr=0.1), NaturalGradient)
    sam = make_optimizer("sam", layer.parameters(), lr=0.1, rho=0.1)
    assert isinstance(sam, SAM) and isinstance(sam.base_optimizer, torch.optim.SGD)
    with pytest.raises(SmoothPurifyError, match="unknown optimizer"):
        make_optimizer("lbfgs", layer.parameters())
    with pytest.raises(SmoothPurifyError, match="SAM base"):
        make_optimizer("sam", layer.parameters(), base="rmsprop", lr=0.1)
