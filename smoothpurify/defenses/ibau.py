"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng, Chen, Park, Mao, Jin & Jia, "Adversarial
Unlearning of Backdoors via Implicit Hypergradient", ICLR 2022).

Backdoor removal as the minimax problem ``min_theta max_{||delta|| <= C} L(theta, delta)`` over
one *universal* input perturbation ``delta`` on the clean data. Each round:

1. inner max: one pass of gradient ascent on ``delta`` (SGD, lr 10 in the authors' code) over
   the clean batches, then projection onto the L2 ball of radius ``pert_norm``;
2. outer min, per clean batch: the gradient of the outer loss (cross entropy with ``delta``
   pasted onto a ``patch_portion`` share of the batch) with respect to the model, *through* the
   inner solution ``delta*(theta)``. By the implicit function theorem, with the inner
   fixed-point map ``Phi(delta, theta) = delta - lr_in * d/d delta L_in(delta, theta)``
   (``L_in = -CE(x + delta) + 0.001 ||delta||^2``),

       dL_out/dtheta = d_theta L_out + (d_theta Phi)^T v,   v = (I - d_delta Phi^T)^{-1} d_delta L_out,

   and ``v`` is approximated by ``K`` fixed-point (Neumann) iterations ``v <- d_delta Phi^T v +
   d_delta L_out`` (the paper's solver) or by ``K`` conjugate-gradient steps on the same system
   (``solver: cg``; ``I - d_delta Phi = lr_in * Hessian`` is symmetric, so CG applies when the
   inner problem is locally convex). :func:`implicit_hypergradient` is the general routine; the
   test suite checks it against finite differences.

Defaults follow the authors' public code as far as we can tell: 5 rounds, K = 5 fixed-point
iterations, inner lr 0.1 for ``Phi``, ``||delta||^2`` weight 1e-3, L2 radius 10, patch share 1%,
Adam on the model (lr 1e-3 here). Batch norm runs in eval mode (running statistics), so the
hypergradient is that of one fixed function of the parameters.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from smoothpurify import SmoothPurifyError
from smoothpurify.defenses import register_defense
from smoothpurify.defenses.common import (Clock, Curves, batches, check_clean_set, finish, resolve_options,
                                          steps_per_epoch, working_copy)
from smoothpurify.model import call_model
from smoothpurify.training import num_samples

DEFAULTS: dict[str, Any] = {
    "rounds": 5,             # outer rounds (each: one inner pass, one outer pass over the clean data)
    "batch_size": 100,
    "lr": 1e-3,              # Adam on the model
    "pert_lr": 10.0,         # SGD ascent on the universal perturbation
    "pert_norm": 10.0,       # L2 radius of the perturbation
    "inner_lr": 0.1,         # step of the fixed-point map Phi
    "inner_reg": 1e-3,       # ||delta||^2 weight in L_in
    "K": 5,                  # solver iterations
    "solver": "fixed_point",  # fixed_point | cg
    "patch_portion": 0.01,   # share of each batch that carries delta in the outer loss (at least one)
}

Loss = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


def implicit_hypergradient(inner_loss: Loss, outer_loss: Loss, w: torch.Tensor, params: Sequence[torch.Tensor],
                           inner_lr: float, iters: int, solver: str = "fixed_point") -> list[torch.Tensor]:
    """``d outer_loss(w*(params), params) / d params`` at an (approximate) inner minimiser ``w``.

    ``w*`` is a fixed point of ``Phi(w) = w - inner_lr * grad_w inner_loss(w, params)``; the
    Jacobian system ``(I - dPhi/dw^T) v = dL_out/dw`` is solved by ``iters`` fixed-point
    iterations or conjugate-gradient steps, then ``grad = dL_out/dparams + (dPhi/dparams)^T v``.
    """
    w = w.detach().requires_grad_(True)
    out = outer_loss(w, params)
    g_w, *g_p = torch.autograd.grad(out, [w, *params], allow_unused=True)
    (grad_in,) = torch.autograd.grad(inner_loss(w, params), w, create_graph=True)
    phi = w - inner_lr * grad_in

    def jvp_t(v: torch.Tensor) -> torch.Tensor:  # (dPhi/dw)^T v
        return torch.autograd.grad(phi, w, grad_outputs=v, retain_graph=True)[0]

    if solver == "fixed_point":
        v = torch.zeros_like(w)
        for _ in range(iters):
            v = jvp_t(v) + g_w
    elif solver == "cg":
        v = torch.zeros_like(w)
        r = g_w.clone()  # residual of A v = g with A v = v - jvp_t(v)
        d, rs = r.clone(), (r * r).sum()
        for _ in range(iters):
            ad = d - jvp_t(d)
            step = rs / (d * ad).sum().clamp_min(1e-30)
            v, r = v + step * d, r - step * ad
            rs_new = (r * r).sum()
            if rs_new.sqrt() < 1e-10:
                break
            d, rs = r + (rs_new / rs) * d, rs_new
    else:
        raise SmoothPurifyError(f"defense ibau: solver must be fixed_point or cg, got {solver!r}")
    mixed = torch.autograd.grad(phi, params, grad_outputs=v, allow_unused=True)
    return [(gp if gp is not None else torch.zeros_like(p)) + (gm if gm is not None else 0)
            for p, gp, gm in zip(params, g_p, mixed)]


def _with_delta(x: Any, delta: torch.Tensor, rows: torch.Tensor | None = None) -> Any:
    """Add ``delta`` to the input (the first tensor of a tuple), to every row or to ``rows`` only."""
    first = x[0] if isinstance(x, (tuple, list)) else x
    if rows is None:
        new = first + delta
    else:
        patch = torch.zeros_like(first)
        patch[rows] = delta[0]
        new = first + patch
    return type(x)((new, *x[1:])) if isinstance(x, (tuple, list)) else new


def unlearn(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any, opts: dict[str, Any],
            seed: int, progress: bool, curves: Curves | None = None) -> list[float]:
    """I-BAU's rounds on ``model`` in place; returns the final perturbation norm of each round."""
    names = [n for n, p in model.named_parameters()]
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=opts["lr"])
    gen = torch.Generator().manual_seed(seed)
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    if not first.is_floating_point():
        raise SmoothPurifyError("defense ibau perturbs inputs and needs floating-point inputs (not token ids)")
    model.eval()  # BN with running statistics: the loss is a fixed function of the parameters

    def forward(ps: Sequence[torch.Tensor], x: Any) -> torch.Tensor:
        args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        return functional_call(model, dict(zip(names, ps)), args)

    n, rounds, norms = num_samples(inputs), int(opts["rounds"]), []
    bar = tqdm(total=rounds * steps_per_epoch(n, opts["batch_size"]), desc="purify ibau",
               disable=None if progress else True, leave=False)
    for rnd in range(1, rounds + 1):
        delta = torch.zeros((1, *first.shape[1:]), device=first.device, requires_grad=True)
        delta_opt = torch.optim.SGD([delta], lr=opts["pert_lr"])
        for x, y in batches(inputs, targets, opts["batch_size"], gen):
            loss = -likelihood.nll(call_model(model, _with_delta(x, delta)), y).mean()
            delta_opt.zero_grad(set_to_none=True)
            loss.backward()  # gradient step on -CE: ascent on the loss
            delta_opt.step()
        with torch.no_grad():
            delta_star = delta * min(1.0, opts["pert_norm"] / max(float(delta.norm()), 1e-12))
        norms.append(float(delta_star.norm()))
        for x, y in batches(inputs, targets, opts["batch_size"], gen):
            count = max(1, int(len(y) * opts["patch_portion"]))
            rows = torch.randperm(len(y), generator=gen)[:count].to(y.device)

            def inner(w, ps, x=x, y=y):
                return -likelihood.nll(forward(ps, _with_delta(x, w)), y).mean() + opts["inner_reg"] * w.pow(2).sum()

            def outer(w, ps, x=x, y=y, rows=rows):
                return likelihood.nll(forward(ps, _with_delta(x, w, rows)), y).mean()

            grads = implicit_hypergradient(inner, outer, delta_star, params, opts["inner_lr"], int(opts["K"]),
                                           opts["solver"])
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, grads):
                p.grad = g.detach()
            opt.step()
            bar.update(1)
        if curves is not None:
            curves(model, rnd, rounds, pert_norm=norms[-1])
    bar.close()
    return norms


@register_defense("ibau")
def implicit_backdoor_adversarial_unlearning(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                                             options: dict[str, Any], *, seed: int = 0, device: str = "cpu",
                                             evaluate=None, eval_every: int | None = None, progress: bool = True,
                                             augment=None):  # unused: no fine-tuning through the core loop
    opts = resolve_options("ibau", options, DEFAULTS)
    check_clean_set("ibau", targets)
    clock = Clock()
    work, inputs, targets = working_copy(model, device, inputs, targets)
    clock.end_setup()
    curves = Curves(evaluate, eval_every, clock)
    norms = unlearn(work, inputs, targets, likelihood, opts, seed, progress, curves)
    return finish("ibau", model, work.state_dict(), clock, opts, seed, evaluate, curves, val=(inputs, targets),
                  perturbation_norms=norms)

