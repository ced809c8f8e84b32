"""Baseline defenses that need more than a preset of the tuning loop (FP, NAD, ANP, I-BAU, AWM, MCR, CLP).

Each defense is a function registered under its name, with the same inputs as
:func:`smoothpurify.purify.purify` — the backdoored model and the clean validation set, never
poisoned data — and the same output (:class:`~smoothpurify.purify.PurifyResult`, whose record has
``seconds.setup`` / ``seconds.tuning``). ``options`` come from params.yaml
(``purify.overrides.<name>``). Defenses reuse the core's tuning loop, parametrizations and metrics.
"""
from __future__ import annotations

from typing import Any, Callable

from smoothpurify.registry import Registry

DefenseFn = Callable[..., Any]
DEFENSES = Registry("defense")


def register_defense(name: str) -> Callable[[DefenseFn], DefenseFn]:
    return DEFENSES.register(name)


def _load_builtin() -> None:
    """Import the defense modules so they register themselves (kept lazy: the core imports fast)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def defense_names() -> list[str]:
    _load_builtin()
    return list(DEFENSES)


def get_defense(name: str) -> DefenseFn:
    _load_builtin()
    return DEFENSES.get_or_raise(name)
