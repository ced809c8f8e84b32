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
DEFENSES = Registry("defense", descriptions={
    "fp": "Fine-Pruning (Liu et al. 2018): prune the channels clean data leaves dormant, then fine-tune",
    "nad": "Neural Attention Distillation (Li et al. 2021): a fine-tuned teacher's attention guides the model",
    "anp": "Adversarial Neuron Pruning (Wu & Wang 2021): prune neurons sensitive to adversarial perturbation",
    "ibau": "I-BAU (Zeng et al. 2022): minimax unlearning of universal adversarial perturbations",
    "awm": "Adversarial Weight Masking (Chai & Chen 2022): soft weight masks against synthesised triggers",
    "mcr": "Mode Connectivity Repair (Zhao et al. 2020): a point on a Bezier path to a fine-tuned copy",
    "clp": "Channel Lipschitzness Pruning (Zheng et al. 2022): data-free pruning of high-Lipschitz channels",
})


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
