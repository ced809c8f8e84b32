"""Sharpness-Aware Minimization (Foret et al., ICLR 2021), the optimizer of the FT-SAM baseline.

SAM minimises ``max_{||e|| <= rho} L(w + e)``. With the first-order solution of the inner problem,
``e(w) = rho * g / ||g||`` (``g = grad L(w)``), one step is: move to ``w + e``, take the gradient
there, come back to ``w`` and let a base optimizer (SGD, Adam, ...) step with that gradient
(Foret et al., Algorithm 1). ``adaptive=True`` is ASAM (Kwon et al., ICML 2021), whose
neighbourhood is scaled by ``T_w = |w|``: ``e = rho * T_w^2 g / ||T_w g||``, so the radius is
invariant to a rescaling of the weights.

Why our own class: ``pytorch-optimizer`` (maintained, Apache-2.0) has a SAM with the same shape
(``SAM(params, base_cls, rho, adaptive, **kw)``, ``first_step``/``second_step``/``step(closure)``),
and ``tests/test_optim.py`` checks ours against it when it is installed; the method is ~40 lines,
so we do not take a 100-optimizer dependency for it. Swapping is a one-line change.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

# Guards the division by ||g|| when the gradient vanishes (then the perturbation is ~0).
_EPS = 1e-12


class SAM(Optimizer):
    """Wraps a base optimizer class; per-group ``rho``/``adaptive`` and base options are allowed.

    Usage, in the usual ``zero_grad -> backward -> step`` loop::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)  # the closure is evaluated at w, then at w + e

    Or call ``first_step()``, backward at the perturbed point, ``second_step()`` by hand.
    """

    def __init__(self, params: Any, base_optimizer_cls: type[Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, adaptive: bool = False, **base_kwargs: Any):
        if rho < 0:
            raise ValueError(f"SAM rho must be non-negative, got {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        # One set of groups and one state for both, so schedulers, state_dict() and
        # load_state_dict() see the base optimizer's momentum buffers and our own options together.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _with_grads(self, group: dict) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        # Multi-tensor (foreach) ops: a handful of kernel launches per step instead of several per
        # parameter, which is what a small model's step costs on a GPU; elementwise, same numbers.
        norms = []
        for group in self.param_groups:
            params = self._with_grads(group)
            if not params:
                continue
            grads = [p.grad for p in params]
            scaled = torch._foreach_mul(grads, torch._foreach_abs(params)) if group["adaptive"] else grads
            norms.extend(torch._foreach_norm(scaled))
        if not norms:
            raise RuntimeError("SAM.first_step() needs gradients: call backward() first")
        # Norms may live on different devices (model parallel); gather them where the first one is.
        return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter to ``w + e(w)``, remembering ``w``."""
        norm = self._grad_norm()
        for group in self.param_groups:
            params = self._with_grads(group)
            if not params:
                continue
            scale = group["rho"] / (norm + _EPS)
            e = torch._foreach_mul([p.grad for p in params], scale.to(params[0].device))
            if group["adaptive"]:
                torch._foreach_mul_(e, torch._foreach_mul(params, params))
            for p, w in zip(params, torch._foreach_mul(params, 1.0)):  # exact copies of w
                self.state[p]["sam_w"] = w
            torch._foreach_add_(params, e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``w`` and let the base optimizer step with the gradient taken at ``w + e``."""
        for group in self.param_groups:
            pairs = [(p, self.state[p].pop("sam_w")) for p in group["params"] if "sam_w" in self.state[p]]
            if pairs:
                torch._foreach_copy_([p for p, _ in pairs], [w for _, w in pairs])
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SAM step, both evaluations inside: the closure at ``w`` (the ascent direction needs
        this step's gradient, never a stale one), then at ``w + e``; returns the loss at ``w``.

        The closure must clear the gradients, recompute the loss and call ``backward()``.
        """
        if closure is None:
            raise RuntimeError("SAM.step() needs a closure that re-evaluates the loss and calls backward()")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict rebinds self.param_groups/self.state; keep the base in step.
        self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state
