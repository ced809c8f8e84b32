"""Purification curves: lambda_max alongside ASR/ACC during tuning, and CSV for ``dvc plots``.

``pipeline.stages.purify`` passes an ``evaluate(model) -> metrics`` callback to the tuning loop, which
calls it every ``purify.curve_every`` epochs and stores the results in the record's ``curves``.
:func:`curve_evaluator` wraps that callback so each point also carries ``lambda_max`` on the
analysis batch; :func:`write_curves_csv` turns the stored points into the CSV ``dvc plots`` reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from smoothpurify.hessian import HessianOperator
from smoothpurify.parametrize import bake_parametrizations
from smoothpurify.smoothness import analysis_settings
from smoothpurify.training import to_device

__all__ = ["CURVE_FIELDS", "write_curves_csv", "curve_evaluator", "lambda_max_fn", "plain_copy", "with_lambda_max"]

CURVE_FIELDS = ("epoch", "val_loss", "acc", "asr", "ra", "lambda_max")


def write_curves_csv(curves: Sequence[dict[str, Any]] | dict[str, Any], path: Path) -> Path:
    """One row per evaluated epoch (``CURVE_FIELDS``; a missing value is an empty cell).

    Accepts the ``curves`` list or a whole purify record.
    """
    from pipeline.report.plots import write_csv  # lazy: keeps matplotlib out of the purify stage's imports

    points = curves.get("curves", []) if isinstance(curves, dict) else curves
    return write_csv(Path(path), CURVE_FIELDS, [[p.get(f) for f in CURVE_FIELDS] for p in points])


def curve_evaluator(base_evaluate: Callable[[nn.Module], dict[str, float]],
                    model_to_lambda_max: Callable[[nn.Module], float]) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate`` that also reports ``lambda_max`` of the model it is given."""
    def evaluate(model: nn.Module) -> dict[str, float]:
        return {**base_evaluate(model), "lambda_max": float(model_to_lambda_max(model))}
    return evaluate


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy with every ``torch.nn.utils.parametrize`` parametrization baked into plain weights.

    The tuning loop hands the callback its working model, which for f-SFT computes each weight
    from singular-value shifts. The Hessian must be taken w.r.t. the weights themselves (as for
    every other model), not w.r.t. the shifts, or curves of different methods would not compare.
    The working model must keep its parametrizations (see :func:`bake_parametrizations`).
    """
    return bake_parametrizations(model)


def lambda_max_fn(inputs: Any, targets: torch.Tensor, likelihood: Any, steps: int = 10,
                  seed: int = 0) -> Callable[[nn.Module], float]:
    """``model -> lambda_max`` on a fixed batch: the top Ritz value of ``steps`` Lanczos steps.

    On the smoke model 8 steps already gave lambda_max to 5 digits (Lanczos converges to the
    extreme eigenvalues much faster than power iteration). The same seed is used at every call,
    so successive points differ only because the model changed.
    """
    def value(model: nn.Module) -> float:
        plain = plain_copy(model).eval()
        device = next(plain.parameters()).device
        params = {n: p for n, p in plain.named_parameters() if p.is_floating_point()}
        gen = torch.Generator().manual_seed(seed)
        with HessianOperator(plain, to_device(inputs, device), targets.to(device), likelihood, params) as op:
            nodes, _ = op.lanczos(steps, gen)
        return float(nodes.max())
    return value


def with_lambda_max(base_evaluate: Callable[[nn.Module], dict[str, float]], run: Any,
                    attack: str) -> Callable[[nn.Module], dict[str, float]]:
    """``base_evaluate``, plus lambda_max on ``attack``'s analysis batch when params
    ``analysis.curve_lambda_steps`` > 0 (builds the batch if the analyze stage has not yet)."""
    from pipeline.analysis import analysis_batch  # noqa: PLC0415 - the analysis stage imports this module's CSV

    steps = analysis_settings(run.params.get("analysis")).curve_lambda_steps
    if not steps:
        return base_evaluate
    inputs, targets, _ = analysis_batch(run.modality_name, run.params, attack)
    return curve_evaluator(base_evaluate, lambda_max_fn(inputs, targets, run.modality.likelihood, steps, run.seed))
