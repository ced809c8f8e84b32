"""A method's name -> something that runs it: a tuning-loop preset or a baseline defense, guarded.

Both kinds take ``run(model, inputs, targets, likelihood, **kw)`` and return a ``PurifyResult``;
:func:`smoothpurify.purify.guarded` flags any of them that diverged or destroyed clean accuracy.
"""
from __future__ import annotations

from typing import Any

from smoothpurify import SmoothPurifyError
from smoothpurify.accel import check_precision
from smoothpurify.defenses import defense_names, get_defense
from smoothpurify.methods import PRESETS, method_config
from smoothpurify.purify import guarded, purify

__all__ = ["make_runner", "method_names"]


def method_names() -> list[str]:
    """Every runnable method: the presets, then the baseline defenses."""
    return [*PRESETS, *defense_names()]


def make_runner(method: str, overrides: dict[str, Any] | None = None, precision: str = "auto"):
    """``(settings, run)`` for a tuning-loop preset or a baseline defense (:mod:`smoothpurify.defenses`).

    ``run(model, inputs, targets, likelihood, **kw)`` returns a ``PurifyResult`` either way; ``kw`` are
    the keyword arguments of :func:`smoothpurify.purify.purify` (classifier, seed, device, evaluate...);
    a baseline defense ignores ``overlay`` and ``unlearn_families`` (it has neither term).
    ``precision`` (:mod:`smoothpurify.accel`) applies to the tuning loop; the baseline defenses run
    their own loops in float32.
    """
    check_precision(precision)  # before any work, like an unknown method
    if method in PRESETS:
        cfg = method_config(method, overrides)
        return cfg.model_dump(), guarded(lambda model, x, y, likelihood, **kw: purify(model, x, y, likelihood, cfg,
                                                                                   precision=precision, **kw))
    if method not in defense_names():
        raise SmoothPurifyError(f"unknown purification method {method!r}; choose one of: "
                                f"{', '.join(list(PRESETS) + defense_names())}")
    defense, options = get_defense(method), dict(overrides or {})

    def run_defense(model, x, y, likelihood, overlay=None, unlearn_families=None, **kw):  # noqa: ARG001 - neither term in a baseline
        return defense(model, x, y, likelihood, options, **kw)

    return {"defense": method, **options}, guarded(run_defense)
