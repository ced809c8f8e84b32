"""Smoothness analysis of one model on one fixed batch (the library half; the stage is pipeline.analysis).

The batch (SFT appendix A.2.2): clean test samples plus poisoned test inputs with their *true*
labels. A backdoored model is fitted to poisoned inputs with the *target* label, so measured on its
own training distribution it looks smooth; measured against the true labels its loss surface is
sharp, which is what purification should undo. The batch is drawn once per attack and saved, so
the benign, backdoored and every purified model are measured on exactly the same samples.

All estimators share one Hessian-vector-product graph (``hessian.HessianOperator``):

* stochastic Lanczos quadrature gives the spectral density, and its Ritz values give
  ``lambda_max`` and the top-k eigenvalues. On the smoke backdoored model Lanczos had
  ``lambda_max`` to 5 digits after 8 HVPs, where power iteration needed 10 for 4, and it returns
  the largest *algebraic* eigenvalue (power iteration returns the largest magnitude, and on this
  batch H also has large negative eigenvalues: -136 next to 251). ``lambda_method: power`` keeps
  PyHessian's way for comparison.
* Hutchinson (Rademacher probes) gives Tr(H) with its standard error. For a backdoored model H is
  strongly indefinite on this batch and the per-probe spread is large (smoke: -508 +- 369 with 24
  probes, against 149 +- 13 for the benign model): read Tr(H) with its stderr.
* Tr(F) (empirical Fisher) is exact, not sampled.
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.hessian import HessianOperator, fisher_trace_value, slq_density
from smoothpurify.model import call_model
from smoothpurify.training import index_inputs

__all__ = ["AnalysisSettings", "analysis_settings", "build_analysis_batch", "analyze_model", "density_from_record",
           "RUNTIME_KEYS"]

# Settings that change how/whether the stage runs, not the numbers: kept out of fingerprints.
RUNTIME_KEYS = frozenset({"curve_lambda_steps", "threads", "enabled"})


class AnalysisSettings(BaseModel):
    """params.yaml ``analysis:``. The defaults analyse one smoke-profile model (SmallCNN, 468k
    parameters, batch 200, 0.4-0.6 s per HVP on one CPU thread) in well under a minute:
    32 Lanczos steps (lambda_max converges in ~8, the top 3 in ~28) + 24 Hutchinson probes =
    56 HVPs, plus Tr(F) (~1.5 s)."""

    model_config = ConfigDict(extra="forbid")

    n_clean: int = Field(100, ge=0)
    n_poison: int = Field(100, ge=0)
    lambda_method: Literal["lanczos", "power"] = "lanczos"
    k: int = Field(3, ge=1)                      # top eigenvalues reported
    max_iter: int = Field(50, ge=1)              # power iteration only
    tol: float = Field(1e-3, gt=0)               # power iteration only (relative change)
    n_probes: int = Field(24, ge=2)              # Hutchinson probes for Tr(H)
    trace_tol: Optional[float] = Field(None, gt=0)  # stop Hutchinson early at this relative stderr
    slq_probes: int = Field(1, ge=1)
    lanczos_steps: int = Field(32, ge=2)
    grid: int = Field(400, ge=10)                # density evaluation points
    fisher: bool = True                          # also Tr(F)
    # lambda_max on purification curves (every purify.curve_every epochs): Lanczos steps, 0 = off.
    # Each point costs a graph build plus this many HVPs (10 steps: ~6 s for the smoke model on
    # one thread, ~20 s with two on a busy machine; see ``threads``).
    curve_lambda_steps: int = Field(0, ge=0)
    # torch CPU threads during the stage (None: leave as is). On a shared 2-core machine two
    # OpenMP threads made each HVP ~5x slower than one (2.0 s vs 0.42 s): a descheduled thread
    # stalls every barrier. Process-wide while the stage runs; restored afterwards.
    threads: Optional[int] = Field(1, ge=1)
    # Read by the flow (analyse every model or none); the stage itself always runs when called.
    enabled: bool = True

    @model_validator(mode="after")
    def _non_empty(self) -> "AnalysisSettings":
        if self.n_clean + self.n_poison == 0:
            raise ValueError("n_clean + n_poison must be at least 1")
        return self


def analysis_settings(section: dict[str, Any] | AnalysisSettings | None) -> AnalysisSettings:
    if isinstance(section, AnalysisSettings):
        return section
    try:
        return AnalysisSettings(**(section or {}))
    except ValidationError as err:
        first = err.errors()[0]
        where = "".join(f".{part}" for part in first["loc"])
        raise SmoothPurifyError(f"params analysis{where}: {first['msg']}") from None


# -- the fixed batch ---------------------------------------------------------------------------------

def _join(x: torch.Tensor, y: torch.Tensor, pad_value: int | None) -> torch.Tensor:
    """``x`` then ``y`` along the batch; sequences of different lengths (the last dimension) are
    right-padded with ``pad_value`` first."""
    if x.shape[1:] != y.shape[1:] and pad_value is not None and x.shape[1:-1] == y.shape[1:-1]:
        width = max(x.shape[-1], y.shape[-1])
        x, y = (torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=pad_value) for t in (x, y))
    if x.shape[1:] != y.shape[1:]:
        raise SmoothPurifyError(f"clean and poisoned samples differ in shape ({list(x.shape[1:])} vs "
                                f"{list(y.shape[1:])}) and the modality names no padding value to join them")
    return torch.cat([x, y])


def _cat(a: Any, b: Any, pad_value: int | None = None) -> Any:
    if isinstance(a, (tuple, list)):
        return type(a)(_join(x, y, pad_value) for x, y in zip(a, b))
    return _join(a, b, pad_value)


def build_analysis_batch(clean_x: Any, clean_y: torch.Tensor, poisoned_x: Any, poisoned_true_y: torch.Tensor,
                         n_clean: int = 100, n_poison: int = 100, seed: int = 0,
                         pad_value: int | None = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """``(inputs, targets, poisoned_mask)``: ``n_clean`` clean samples then ``n_poison`` poisoned
    inputs with their true labels, drawn without replacement by ``seed`` (order kept sorted).
    Token sequences (translation) of different lengths are right-padded with ``pad_value``."""
    if n_clean > len(clean_y) or n_poison > len(poisoned_true_y):
        raise SmoothPurifyError(f"analysis batch wants {n_clean} clean and {n_poison} poisoned samples, but only "
                                f"{len(clean_y)} clean and {len(poisoned_true_y)} poisoned test inputs exist; "
                                "lower analysis.n_clean / analysis.n_poison")
    gen = torch.Generator().manual_seed(int(seed))
    ci = torch.randperm(len(clean_y), generator=gen)[:n_clean].sort().values
    pi = torch.randperm(len(poisoned_true_y), generator=gen)[:n_poison].sort().values
    inputs = _cat(index_inputs(clean_x, ci), index_inputs(poisoned_x, pi), pad_value)
    targets = _join(clean_y[ci], poisoned_true_y[pi], pad_value)
    mask = torch.cat([torch.zeros(n_clean, dtype=torch.bool), torch.ones(n_poison, dtype=torch.bool)])
    return inputs, targets, mask



# -- the analysis of one model -----------------------------------------------------------------------

@torch.no_grad()
def _part_losses(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                 mask: torch.Tensor | None) -> dict[str, float | None]:
    was_training = model.training
    model.eval()
    try:
        nll = likelihood.nll(call_model(model, inputs), targets).float().cpu()
    finally:
        model.train(was_training)
    out: dict[str, float | None] = {"loss": float(nll.mean())}
    if mask is not None:
        mask = mask.cpu().bool()
        out["loss_clean"] = float(nll[~mask].mean()) if (~mask).any() else None
        out["loss_poison"] = float(nll[mask].mean()) if mask.any() else None
    return out


def _ritz_top(runs: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> list[float]:
    # Ritz values are lower bounds of the top eigenvalues (interlacing): per rank, the best probe wins.
    ranked = [nodes.sort(descending=True).values for nodes, _ in runs]
    depth = min(k, max(len(r) for r in ranked))
    return [max(float(r[i]) for r in ranked if len(r) > i) for i in range(depth)]


def density_from_record(record: dict[str, Any], grid: int | None = None) -> dict[str, list[float]]:
    """Smoothed spectral density from a record's stored SLQ nodes and weights (deterministic)."""
    nodes = torch.tensor(record["slq_nodes"], dtype=torch.float64)
    weights = torch.tensor(record["slq_weights"], dtype=torch.float64)
    g, d = slq_density(nodes, weights, int(grid or record.get("settings", {}).get("grid", 400)), None)
    return {"grid": g.tolist(), "values": d.tolist()}


def analyze_model(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any,
                  settings: dict[str, Any] | AnalysisSettings | None = None, *, seed: int = 0,
                  poisoned: torch.Tensor | None = None) -> dict[str, Any]:
    """lambda_max, top-k, Tr(H) +- stderr, Tr(F), SLQ density and losses of ``model`` on one batch.

    The Hessian is w.r.t. every floating-point parameter (frozen ones included), so models tuned
    with any parametrization are comparable. ``poisoned`` (a bool mask) splits the reported loss.
    Returns a JSON-able dict; ``density`` holds ``grid`` and ``values``.
    """
    s = analysis_settings(settings)
    gen = torch.Generator().manual_seed(int(seed))
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    start = time.perf_counter()
    with HessianOperator(model, inputs, targets, likelihood, params) as op:
        runs = [op.lanczos(s.lanczos_steps, gen) for _ in range(s.slq_probes)]
        top = (op.top_eigenvalues(s.k, s.max_iter, s.tol, gen) if s.lambda_method == "power"
               else _ritz_top(runs, s.k))
        trace = op.hutchinson(s.n_probes, s.trace_tol, gen)
        n_hvp, dim = op.n_hvp, op.dim
    nodes = torch.cat([n for n, _ in runs])
    weights = torch.cat([w for _, w in runs]) / s.slq_probes
    grid, values = slq_density(nodes, weights, s.grid, None)
    trace_f = fisher_trace_value(model, inputs, targets, likelihood, params) if s.fisher else None
    seconds = time.perf_counter() - start
    return {
        "lambda_max": top[0], "top_k": top, "lambda_min": float(nodes.min()),
        "trace_h": trace["mean"], "trace_h_stderr": trace["stderr"], "trace_f": trace_f,
        **_part_losses(model, inputs, targets, likelihood, poisoned),
        "n_hvp": n_hvp, "n_params": dim, "seconds": round(seconds, 3),
        "slq_nodes": nodes.tolist(), "slq_weights": weights.tolist(),
        "density": {"grid": grid.tolist(), "values": values.tolist()},
        "settings": s.model_dump(), "seed": int(seed),
    }
