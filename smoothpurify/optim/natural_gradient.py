"""Natural-gradient descent for a small set of parameters (NGF's classifier layer).

NGF (Karim et al., "Efficient Backdoor Removal Through Natural Gradient Fine-tuning", eqs. 5-6)
updates ``theta <- theta - lr * F^-1 grad L_p`` with the empirical Fisher of the tuned layer,
``F = (1/n) sum_j grad l_j grad l_j^T`` (``l_j`` the per-sample log-likelihood), and ``grad L_p``
the gradient of the whole objective (CE + the Fisher anchor), which is what ``p.grad`` holds.
``F`` is singular when ``n`` < #parameters, so we solve with Tikhonov damping (Martens 2010):
``update = (F + damping I)^-1 grad``.

The Fisher needs per-sample gradients, which an optimizer never sees, so the caller supplies the
curvature before each ``step()``:

* ``solver="exact"``: ``update_fisher(per_sample_grads)``; one Cholesky solve over the concatenated,
  flattened parameters of each param group. When the batch is smaller than the layer
  (``B < N``, the usual NGF case: 500 clean samples, a 5,130-parameter CIFAR-10 head) we keep the
  ``B x N`` factor ``U`` (``F = U^T U``) and solve the same system through the Woodbury identity
  with a ``B x B`` Cholesky factor, in float64 because the identity subtracts nearly equal vectors.
* ``solver="kfac"`` (Martens & Grosse, ICML 2015): for a linear layer ``z = W a + b``,
  ``F ~= G (x) A`` with ``A = E[a~ a~^T]`` (``a~ = [a, 1]`` with a bias) and ``G = E[g g^T]``,
  ``g_j = d l_j / d z_j`` -- the gradient of sample ``j``'s *own* loss. If you backpropagate a
  batch *mean*, multiply the output gradients by ``B`` first (the scale of ``G`` would otherwise be
  off by ``B^2``). The update is ``(G + sqrt(damping) I)^-1 grad_W (A + sqrt(damping) I)^-1``
  with ``grad_W = [dW | db]``: factored Tikhonov damping (Martens & Grosse, sec. 6.3, with their
  ``pi = 1``), which adds ``sqrt(damping) (G (x) I + I (x) A) + damping I`` to ``G (x) A`` --
  not exactly ``damping I``, but it keeps the inverse Kronecker-factored.
* ``solver="auto"``: exact when the group has at most ``max_exact`` parameters, else K-FAC.
  The resolved solver is in ``param_groups[i]["solver"]`` (and ``.solvers``), so a caller knows
  which curvature to compute.

``fisher_decay`` (``None`` = use the latest curvature only, NGF's Algorithm 1) keeps an
exponential moving average ``C <- decay C + (1 - decay) C_new`` of ``F`` or of ``A`` and ``G``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch.optim import Optimizer

from smoothpurify import SmoothPurifyError

SOLVERS = ("auto", "exact", "kfac")


def _cholesky(matrix: torch.Tensor, what: str) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise SmoothPurifyError(f"natural gradient: {what} is not positive definite "
                                f"(non-finite curvature or damping too small); increase damping")
    return factor


def _ema(old: torch.Tensor | None, new: torch.Tensor, decay: float | None) -> torch.Tensor:
    return new if old is None or decay is None else old.mul(decay).add_(new, alpha=1.0 - decay)


class NaturalGradient(Optimizer):
    """``NaturalGradient(params, lr, damping, momentum, solver, max_exact, fisher_decay)``.

    Each param group has its own curvature block (block-diagonal Fisher across groups). Momentum,
    as in SGD, accumulates the preconditioned update: ``v <- momentum v + F^-1 g; p -= lr v``.
    """

    def __init__(self, params: Any, lr: float = 0.01, damping: float = 1e-3, momentum: float = 0.0,
                 solver: str = "auto", max_exact: int = 20000, fisher_decay: float | None = None):
        if solver not in SOLVERS:
            raise SmoothPurifyError(f"unknown natural-gradient solver {solver!r}; choose one of {SOLVERS}")
        if lr <= 0 or damping <= 0 or not 0 <= momentum < 1:
            raise SmoothPurifyError(f"natural gradient needs lr > 0, damping > 0, 0 <= momentum < 1 "
                                    f"(got lr={lr}, damping={damping}, momentum={momentum})")
        if fisher_decay is not None and not 0 <= fisher_decay < 1:
            raise SmoothPurifyError(f"fisher_decay must be in [0, 1) or None, got {fisher_decay}")
        defaults = dict(lr=lr, damping=damping, momentum=momentum, solver=solver,
                        max_exact=max_exact, fisher_decay=fisher_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            numel = sum(p.numel() for p in group["params"])
            if group["solver"] == "auto":
                group["solver"] = "exact" if numel <= group["max_exact"] else "kfac"
            if group["solver"] == "kfac":
                self._linear_layout(group)  # fail now, not at the first step

    @property
    def solvers(self) -> list[str]:
        """The resolved solver of each param group ("exact" or "kfac")."""
        return [g["solver"] for g in self.param_groups]

    # -- curvature, supplied by the caller -------------------------------------------------------

    @torch.no_grad()
    def update_fisher(self, per_sample_grads: Sequence[torch.Tensor]) -> None:
        """Set the exact Fisher from per-sample gradients ``[B, *p.shape]``, one per parameter.

        The list is aligned with the parameters of all groups in order (groups using K-FAC skip
        theirs: pass ``None`` there). ``per_sample_grads[i][j]`` is the gradient of sample ``j``'s
        own log-likelihood (or NLL: the sign does not matter), not of the batch mean.
        """
        grads = list(per_sample_grads)
        n_params = sum(len(g["params"]) for g in self.param_groups)
        if len(grads) != n_params:
            raise SmoothPurifyError(f"update_fisher got {len(grads)} per-sample gradients for {n_params} parameters")
        start = 0
        for group in self.param_groups:
            params, chunk = group["params"], grads[start:start + len(group["params"])]
            start += len(params)
            if group["solver"] != "exact":
                continue
            if any(g is None for g in chunk):
                raise SmoothPurifyError("update_fisher: missing per-sample gradient for an exact-solver parameter")
            batch = chunk[0].shape[0]
            for p, g in zip(params, chunk):
                if g.shape != (batch, *p.shape):
                    raise SmoothPurifyError(f"per-sample gradient of shape {tuple(g.shape)} does not match "
                                            f"parameter {tuple(p.shape)} with batch {batch}")
            flat = torch.cat([g.reshape(batch, -1) for g in chunk], dim=1)
            state = self.state[params[0]]
            state.pop("chol", None)
            numel = flat.shape[1]
            if group["fisher_decay"] is None and batch < numel:
                # F = U^T U with U = flat / sqrt(B): rank <= B, solved through Woodbury.
                state.pop("fisher", None)
                state["fisher_u"] = flat.to(torch.float64) / math.sqrt(batch)
            else:
                state.pop("fisher_u", None)
                new = flat.T @ flat / batch
                state["fisher"] = _ema(state.get("fisher"), new, group["fisher_decay"])

    @torch.no_grad()
    def update_kfac(self, layer_inputs: torch.Tensor, output_grads: torch.Tensor, has_bias: bool,
                    group: int = 0) -> None:
        """Set K-FAC factors for the linear layer of param group ``group``.

        ``layer_inputs``: ``[B, in]`` (the layer's inputs ``a_j``); ``output_grads``: ``[B, out]``,
        ``g_j = d l_j / d z_j`` for sample ``j``'s own loss (see the module docstring for the scale).
        """
        pg = self.param_groups[group]
        if pg["solver"] != "kfac":
            raise SmoothPurifyError(f"param group {group} uses the {pg['solver']!r} solver: call update_fisher")
        weight, bias = self._linear_layout(pg)
        if has_bias != (bias is not None):
            raise SmoothPurifyError(f"update_kfac: has_bias={has_bias} but the param group "
                                    f"{'has' if bias is not None else 'has no'} bias")
        a, g = layer_inputs.reshape(layer_inputs.shape[0], -1), output_grads.reshape(output_grads.shape[0], -1)
        scale = 1
        positions = a.shape[1] // weight.shape[1] if weight.shape[1] else 0
        if positions > 1 and a.shape[1] == positions * weight.shape[1] and g.shape[1] == positions * weight.shape[0]:
            # A head applied at every position of a sequence ([B, T * in]): positions are rows of A and G
            # (Grosse & Martens 2016's treatment of shared weights); G is summed over a sample's positions,
            # so the factors keep one sentence's scale against the damping.
            a, g, scale = a.reshape(-1, weight.shape[1]), g.reshape(-1, weight.shape[0]), positions
        if a.shape != (g.shape[0], weight.shape[1]) or g.shape[1] != weight.shape[0]:
            raise SmoothPurifyError(f"update_kfac: inputs {tuple(a.shape)} / output grads {tuple(g.shape)} "
                                    f"do not fit a weight of shape {tuple(weight.shape)}")
        if has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        batch = a.shape[0]
        state = self.state[weight]
        state.pop("chol", None)
        state["kfac_A"] = _ema(state.get("kfac_A"), a.T @ a / batch, pg["fisher_decay"])
        state["kfac_G"] = _ema(state.get("kfac_G"), g.T @ g * scale / batch, pg["fisher_decay"])

    # -- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One natural-gradient step. A closure with a ``curvature(optimizer)`` method first gives
        this optimizer the batch's Fisher (``update_fisher`` or ``update_kfac``), so the loop calls
        ``step(closure)`` as for any optimizer; then the closure computes the gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                if hasattr(closure, "curvature"):
                    closure.curvature(self)
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            if all(p.grad is None for p in params):
                continue
            if group["solver"] == "exact":
                updates = self._exact_update(group)
            else:
                updates = self._kfac_update(group)
            for p, u in zip(params, updates):
                if group["momentum"]:
                    buf = self.state[p].get("momentum_buffer")
                    buf = u.clone() if buf is None else buf.mul_(group["momentum"]).add_(u)
                    self.state[p]["momentum_buffer"] = buf
                    u = buf
                p.add_(u.to(p.dtype), alpha=-group["lr"])
        return loss

    def _exact_update(self, group: dict) -> list[torch.Tensor]:
        params, damping = group["params"], group["damping"]
        state = self.state[params[0]]
        if "fisher" not in state and "fisher_u" not in state:
            raise RuntimeError("NaturalGradient.step() called before update_fisher(): "
                               "supply the per-sample gradients of the tuned parameters first")
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        cached = state.get("chol")
        if "fisher_u" in state:
            u = state["fisher_u"]
            if cached is None or cached[0] != damping:
                kernel = u @ u.T
                kernel.diagonal().add_(damping)
                cached = (damping, _cholesky(kernel, "U U^T + damping I"))
                state["chol"] = cached
            g64 = grad.to(torch.float64)
            # Woodbury: (U^T U + d I)^-1 g = (g - U^T (U U^T + d I)^-1 U g) / d
            inner = torch.cholesky_solve((u @ g64).unsqueeze(1), cached[1]).squeeze(1)
            flat = (g64 - u.T @ inner) / damping
        else:
            if cached is None or cached[0] != damping:
                fisher = state["fisher"].clone()
                fisher.diagonal().add_(damping)
                cached = (damping, _cholesky(fisher, "F + damping I"))
                state["chol"] = cached
            flat = torch.cholesky_solve(grad.to(cached[1].dtype).unsqueeze(1), cached[1]).squeeze(1)
        out, offset = [], 0
        for p in params:
            out.append(flat[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return out

    def _kfac_update(self, group: dict) -> list[torch.Tensor]:
        weight, bias = self._linear_layout(group)
        state = self.state[weight]
        if "kfac_A" not in state:
            raise RuntimeError("NaturalGradient.step() called before update_kfac(): "
                               "supply the layer inputs and per-sample output gradients first")
        damping = group["damping"]
        cached = state.get("chol")
        if cached is None or cached[0] != damping:
            root = math.sqrt(damping)
            a_d, g_d = state["kfac_A"].clone(), state["kfac_G"].clone()
            a_d.diagonal().add_(root)
            g_d.diagonal().add_(root)
            cached = (damping, _cholesky(a_d, "A + sqrt(damping) I"), _cholesky(g_d, "G + sqrt(damping) I"))
            state["chol"] = cached
        _, chol_a, chol_g = cached
        grad_w = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        if bias is not None:
            grad_b = bias.grad if bias.grad is not None else torch.zeros_like(bias)
            grad_w = torch.cat([grad_w, grad_b.unsqueeze(1)], dim=1)
        # (G + rI)^-1 grad_W (A + rI)^-1: solve on the left, then (A symmetric) on the right via a transpose.
        left = torch.cholesky_solve(grad_w.to(chol_g.dtype), chol_g)
        update = torch.cholesky_solve(left.T.to(chol_a.dtype), chol_a).T
        if bias is None:
            return [update]
        by_param = {id(weight): update[:, :-1], id(bias): update[:, -1]}
        return [by_param[id(p)] for p in group["params"]]

    @staticmethod
    def _linear_layout(group: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [out, in], bias [out] or None) of a K-FAC group; the order in the group is free."""
        params = group["params"]
        weights = [p for p in params if p.dim() == 2]
        biases = [p for p in params if p.dim() == 1]
        if len(weights) != 1 or len(biases) > 1 or len(weights) + len(biases) != len(params) or \
                (biases and biases[0].shape[0] != weights[0].shape[0]):
            shapes = [tuple(p.shape) for p in params]
            raise SmoothPurifyError("K-FAC needs each param group to hold one linear layer: a weight "
                                    f"[out, in] and optionally its bias [out]; got shapes {shapes}")
        return weights[0], (biases[0] if biases else None)
