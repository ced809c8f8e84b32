"""Optimizers of the purification loop: SGD / Adam (torch), SAM (FT-SAM), natural gradient (NGF).

``make_optimizer`` turns a configuration name into an optimizer, so that the choice of optimizer
is configuration, not code. Every optimizer is driven the same way, ``step(closure)``: what is special
about one (SAM's second evaluation, the natural gradient's curvature update) happens inside it.
"""
from __future__ import annotations

from typing import Any

import torch

from smoothpurify import SmoothPurifyError
from smoothpurify.optim.natural_gradient import NaturalGradient
from smoothpurify.optim.sam import SAM

__all__ = ["SAM", "NaturalGradient", "make_optimizer", "OPTIMIZERS"]

_TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
OPTIMIZERS = ("sgd", "adam", "sam", "natural_gradient")


def make_optimizer(name: str, params: Any, **kw: Any) -> torch.optim.Optimizer:
    """``name`` is one of ``OPTIMIZERS``; ``kw`` go to the optimizer's constructor.

    For ``"sam"``, ``base`` picks the wrapped optimizer (``"sgd"`` by default, ``"adam"``, or an
    optimizer class); the remaining ``kw`` (``rho``, ``adaptive``, ``lr``, ``momentum``...) go to
    SAM and the base optimizer.
    """
    key = name.lower().replace("-", "_")
    if key in _TORCH:
        return _TORCH[key](params, **kw)
    if key == "sam":
        base = kw.pop("base", "sgd")
        if isinstance(base, str):
            if base.lower() not in _TORCH:
                raise SmoothPurifyError(f"unknown SAM base optimizer {base!r}; choose one of {sorted(_TORCH)}")
            base = _TORCH[base.lower()]
        return SAM(params, base, **kw)
    if key == "natural_gradient":
        return NaturalGradient(params, **kw)
    raise SmoothPurifyError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
