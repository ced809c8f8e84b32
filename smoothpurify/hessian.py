"""Smoothness of the loss surface at one batch: top Hessian eigenvalues, Tr(H), spectral density.

The loss is ``L = mean_j nll_j`` over the batch (the modality's likelihood), with the model in eval
mode (batch norm on running statistics, no dropout), as in SFT's appendix A.2.2 and NGF sec. V.
Everything is matrix-free: ``HessianOperator`` builds the gradient graph once
(``create_graph=True``) and every Hessian-vector product is one more backward through it
(Pearlmutter 1994). The estimators follow PyHessian (Yao et al., 2020), one short function each:

* ``top_eigenvalues``: power iteration with deflation. Power iteration converges to the
  eigenvalue of **largest magnitude** (returned with its sign); at a trained minimum the Hessian is
  nearly PSD, so that is the largest algebraic one the papers report as ``lambda_max``.
* ``hessian_trace``: Hutchinson's estimator ``E[z^T H z]`` with Rademacher ``z`` (Avron & Toledo 2011).
* ``spectral_density``: stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao, ICML 2019;
  Lin, Saad & Yang 2016) with full reorthogonalisation.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.model import call_model

__all__ = ["HessianOperator", "top_eigenvalues", "hessian_trace", "spectral_density", "slq_density",
           "fisher_trace_value", "analyze"]


def _resolve_params(model: nn.Module, params: Any) -> dict[str, torch.Tensor]:
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    elif not isinstance(params, Mapping):
        params = {str(i): p for i, p in enumerate(params)}
    if not params:
        raise SmoothPurifyError("smoothness analysis: no parameters to differentiate (all frozen?)")
    return dict(params)


class HessianOperator:
    """``H v`` for the mean NLL of one batch w.r.t. ``params``; use as a context manager.

    Inside the ``with`` block the chosen parameters require grad and the rest of the model does
    not (so analysing only a classifier does not build a double-backward graph through the
    backbone); both are restored on exit. The training flag is restored as soon as the graph exists.
    Vectors are flat, in the order of ``params``.
    """

    def __init__(self, model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                 params: Any = None):
        self.model, self.inputs, self.targets, self.likelihood = model, inputs, targets, likelihood
        self.params = _resolve_params(model, params)
        self.n_hvp = 0
        self._flags: list[tuple[torch.Tensor, bool]] = []

    def __enter__(self) -> "HessianOperator":
        tensors = list(self.params.values())
        chosen = {id(t) for t in tensors}
        seen = set()
        for t in [*self.model.parameters(), *tensors]:
            if id(t) not in seen:
                seen.add(id(t))
                self._flags.append((t, t.requires_grad))
                t.requires_grad_(id(t) in chosen)
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.enable_grad():
                loss = self.likelihood.nll(call_model(self.model, self.inputs), self.targets).mean()
                grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
        except BaseException:
            self._restore()
            raise
        finally:
            self.model.train(was_training)
        self.loss = float(loss.detach())
        self._tensors = tensors
        self._sizes = [t.numel() for t in tensors]
        self.dim = sum(self._sizes)
        self.dtype, self.device = tensors[0].dtype, tensors[0].device
        # Gradients that do not depend on the parameters (or are absent) have a zero Hessian row.
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._live]
        return self

    def __exit__(self, *exc: Any) -> None:
        self._grads = []  # frees the graph
        self._restore()

    def _restore(self) -> None:
        for t, flag in self._flags:
            t.requires_grad_(flag)
        self._flags = []

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.n_hvp += 1
        if not self._live:
            return torch.zeros_like(v)
        chunks = torch.split(v.to(self.dtype), self._sizes)
        with torch.enable_grad():
            hv = torch.autograd.grad(self._grads, [self._tensors[i] for i in self._live],
                                     grad_outputs=[chunks[i].view_as(self._tensors[i]) for i in self._live],
                                     retain_graph=True, allow_unused=True)
        out = [torch.zeros(n, dtype=self.dtype, device=self.device) for n in self._sizes]
        for i, h in zip(self._live, hv):
            if h is not None:
                out[i] = h.reshape(-1)
        return torch.cat(out)

    def rademacher(self, generator: torch.Generator | None) -> torch.Tensor:
        dev = generator.device if generator is not None else "cpu"
        z = torch.randint(0, 2, (self.dim,), generator=generator, device=dev)
        return (2.0 * z - 1.0).to(self.device, self.dtype)

    def gaussian(self, generator: torch.Generator | None) -> torch.Tensor:
        dev = generator.device if generator is not None else "cpu"
        return torch.randn(self.dim, generator=generator, device=dev).to(self.device, self.dtype)

    # -- the estimators, each on this one graph (PyHessian's shape: one public method each) ----------
    def top_eigenvalues(self, k: int, max_iter: int = 50, tol: float = 1e-3,
                        generator: torch.Generator | None = None) -> list[float]:
        """Power iteration with deflation: the ``k`` eigenvalues of largest magnitude."""
        return _top_eigenvalues(self, k, max_iter, tol, generator)

    def hutchinson(self, n_probes: int, tol: float | None = None,
                   generator: torch.Generator | None = None) -> dict[str, float]:
        """Tr(H) by Rademacher probes: ``mean``, ``stderr``, ``probes``."""
        return _hutchinson(self, n_probes, tol, generator)

    def lanczos(self, steps: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One Lanczos run from a random start: Ritz values (SLQ nodes) and their quadrature weights."""
        return _lanczos(self, steps, generator)


def _orthogonalize(v: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    for b in basis:
        v = v - torch.dot(v, b) * b
    return v


# -- estimators on an operator (analyze() shares one graph between them) -------------------------

def _top_eigenvalues(op: HessianOperator, k: int, max_iter: int, tol: float,
                     generator: torch.Generator | None) -> list[float]:
    values: list[float] = []
    vectors: list[torch.Tensor] = []
    for _ in range(min(k, op.dim)):
        v = _orthogonalize(op.gaussian(generator), vectors)
        v = v / v.norm()
        value = None
        for _ in range(max_iter):
            hv = op(v)
            rayleigh = float(torch.dot(hv, v))
            # Deflation: iterate in the complement of the eigenvectors already found.
            w = _orthogonalize(hv, vectors)
            norm = w.norm()
            converged = value is not None and abs(rayleigh - value) <= tol * (abs(value) + 1e-30)
            value = rayleigh
            if converged or float(norm) == 0.0:
                break
            v = w / norm
        values.append(value)
        vectors.append(v)
    return values


def _hutchinson(op: HessianOperator, n_probes: int, tol: float | None,
                generator: torch.Generator | None) -> dict[str, float]:
    samples: list[float] = []
    mean = stderr = float("nan")
    for _ in range(n_probes):
        z = op.rademacher(generator)
        samples.append(float(torch.dot(z, op(z))))
        n = len(samples)
        mean = sum(samples) / n
        stderr = math.sqrt(sum((s - mean) ** 2 for s in samples) / (n - 1) / n) if n > 1 else float("nan")
        # Stop once the estimate is known to a relative standard error of ``tol``.
        if tol is not None and n > 2 and stderr <= tol * abs(mean):
            break
    return {"mean": mean, "stderr": stderr}


def _lanczos(op: HessianOperator, steps: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values and quadrature weights (squared first components) of one Lanczos run."""
    v = op.gaussian(generator)
    v = v / v.norm()
    basis = [v]
    alphas, betas = [], []
    scale = 0.0
    tiny = 1e3 * torch.finfo(op.dtype).eps
    for j in range(min(steps, op.dim)):
        w = op(basis[-1])
        alpha = torch.dot(w, basis[-1])
        alphas.append(float(alpha))
        if j + 1 == min(steps, op.dim):
            break
        stacked = torch.stack(basis)
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough", Parlett)
            w = w - stacked.T @ (stacked @ w)
        beta = float(w.norm())
        scale = max(scale, abs(alphas[-1]), beta)
        if beta <= tiny * max(scale, 1e-30):  # invariant subspace found: the quadrature is exact
            break
        betas.append(beta)
        basis.append(w / beta)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(t)
    return nodes, vecs[0] ** 2


def slq_density(nodes: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor | int,
             sigma: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 0.01 * max(1.0, abs(hi))
    if isinstance(grid, int):
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid, dtype=torch.float64)
    grid = grid.to(torch.float64)
    gauss = torch.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = gauss @ weights
    area = torch.trapezoid(density, grid)
    if float(area) > 0:
        density = density / area
    return grid, density


# -- public API -----------------------------------------------------------------------------------

def top_eigenvalues(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                    params: Any = None, k: int = 1, max_iter: int = 100, tol: float = 1e-3,
                    generator: torch.Generator | None = None) -> tuple[list[float], int]:
    """The ``k`` Hessian eigenvalues of largest magnitude (in decreasing order), and #HVPs used.

    Stops each power iteration when the Rayleigh quotient changes by less than ``tol`` (relative).
    """
    if k < 1 or max_iter < 1:
        raise SmoothPurifyError(f"power iteration needs k >= 1 and max_iter >= 1 (got {k}, {max_iter})")
    with HessianOperator(model, inputs, targets, likelihood, params) as op:
        return _top_eigenvalues(op, k, max_iter, tol, generator), op.n_hvp


def hessian_trace(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                  params: Any = None, n_probes: int = 100, tol: float | None = None,
                  generator: torch.Generator | None = None) -> dict[str, float]:
    """Hutchinson estimate of Tr(H): ``{"mean", "stderr", "n_hvp"}``.

    With ``tol``, stops early once ``stderr <= tol * |mean|`` (after at least 3 probes).
    """
    if n_probes < 1:
        raise SmoothPurifyError(f"Hutchinson's estimator needs n_probes >= 1, got {n_probes}")
    with HessianOperator(model, inputs, targets, likelihood, params) as op:
        return {**_hutchinson(op, n_probes, tol, generator), "n_hvp": op.n_hvp}


def spectral_density(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                     params: Any = None, n_probes: int = 3, lanczos_steps: int = 80,
                     grid: torch.Tensor | int = 1000, sigma: float | None = None,
                     generator: torch.Generator | None = None) -> dict[str, Any]:
    """Stochastic Lanczos quadrature of the eigenvalue density of H.

    Returns ``grid`` and ``density`` (Gaussian-smoothed with width ``sigma``, default 1% of the
    spread of the nodes; normalised to integrate to 1 over the grid), the quadrature ``nodes``
    (Ritz values of every probe, concatenated) and ``weights`` (summing to 1: each probe's squared
    first eigenvector components divided by ``n_probes``), and ``n_hvp``. All float64 CPU tensors.
    """
    if n_probes < 1 or lanczos_steps < 1:
        raise SmoothPurifyError(f"spectral density needs n_probes >= 1 and lanczos_steps >= 1 "
                                f"(got {n_probes}, {lanczos_steps})")
    with HessianOperator(model, inputs, targets, likelihood, params) as op:
        runs = [_lanczos(op, lanczos_steps, generator) for _ in range(n_probes)]
        n_hvp = op.n_hvp
    nodes = torch.cat([n for n, _ in runs])
    weights = torch.cat([w for _, w in runs]) / n_probes
    grid, density = slq_density(nodes, weights, grid, sigma)
    return {"grid": grid, "density": density, "nodes": nodes, "weights": weights, "n_hvp": n_hvp}


def fisher_trace_value(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                       params: Any = None) -> float:
    """Tr(F) = (1/B) sum_j ||grad nll_j||^2 at the same point (empirical Fisher, eval mode).

    Uses ``smoothpurify.fisher.fisher_trace`` when that module exists, else a per-sample loop.
    """
    was_training = model.training
    model.eval()
    try:
        try:
            from smoothpurify.fisher import fisher_trace  # lazy: written alongside this module
        except ImportError:
            fisher_trace = None
        if fisher_trace is not None:
            # Only the value is wanted: no_grad keeps its double-backward graph from being built
            # (torch.func.grad inside still differentiates; it ignores an outer no_grad).
            with torch.no_grad():
                value = fisher_trace(model, inputs, targets, likelihood, params=params)
            return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        return _fisher_trace_loop(model, inputs, targets, likelihood, params)
    finally:
        model.train(was_training)


def _fisher_trace_loop(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                       params: Any) -> float:
    tensors = list(_resolve_params(model, params).values())
    flags = [t.requires_grad for t in tensors]
    batch = targets.shape[0]
    total = 0.0
    try:
        for t in tensors:
            t.requires_grad_(True)  # explicitly named frozen parameters are differentiated too
        for j in range(batch):
            x = tuple(t[j:j + 1] for t in inputs) if isinstance(inputs, (tuple, list)) else inputs[j:j + 1]
            with torch.enable_grad():
                nll = likelihood.nll(call_model(model, x), targets[j:j + 1]).sum()
                grads = torch.autograd.grad(nll, tensors, allow_unused=True)
            total += sum(float(g.pow(2).sum()) for g in grads if g is not None)
    finally:
        for t, flag in zip(tensors, flags):
            t.requires_grad_(flag)
    return total / batch


def analyze(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
            params: Any = None, k: int = 1, max_iter: int = 100, tol: float = 1e-3,
            n_probes: int = 100, trace_tol: float | None = None, fisher: bool = True,
            generator: torch.Generator | None = None) -> dict[str, Any]:
    """lambda_max, the top-k eigenvalues, Tr(H) +- stderr and Tr(F) at one batch, sharing one graph.

    Returns ``{"lambda_max", "top_k", "trace_h", "trace_h_stderr", "trace_f", "n_hvp", "seconds"}``
    (``trace_f`` is None with ``fisher=False``).
    """
    if k < 1 or max_iter < 1 or n_probes < 1:
        raise SmoothPurifyError(f"analyze needs k, max_iter and n_probes >= 1 (got {k}, {max_iter}, {n_probes})")
    start = time.perf_counter()
    with HessianOperator(model, inputs, targets, likelihood, params) as op:
        top = _top_eigenvalues(op, k, max_iter, tol, generator)
        trace = _hutchinson(op, n_probes, trace_tol, generator)
        n_hvp = op.n_hvp
    trace_f = fisher_trace_value(model, inputs, targets, likelihood, params) if fisher else None
    return {"lambda_max": top[0], "top_k": top, "trace_h": trace["mean"],
            "trace_h_stderr": trace["stderr"], "trace_f": trace_f, "n_hvp": n_hvp,
            "seconds": time.perf_counter() - start}
