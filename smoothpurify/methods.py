"""Purification methods as named presets of three choices: parametrization x objective x optimizer.

SFT (Karim et al., "Fisher Information guided Purification against Backdoor Attacks", Eq. 6-7,
A.5.2), NGF (Karim et al., "Efficient Backdoor Removal Through Natural Gradient Fine-tuning",
Algorithm 1), vanilla FT, FT-SAM (Zhu et al. 2023) and the papers' ablations are rows of
:data:`PRESETS`; an ablation is a preset with a term switched off, never new code. Any field can be
overridden from params.yaml (``purify.overrides.<method>``).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smoothpurify import SmoothPurifyError


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    # what is tuned
    parametrization: Literal["full", "spectral", "last_layer"]
    tune_bias: bool = False
    tune_norm: bool = False
    cache_features: bool = True          # last_layer: compute backbone features once
    # objective: NLL + trace_weight * Tr(F) (every trace_every steps) + anchor_weight / 2 * L_r
    trace_weight: float = Field(0.0, ge=0)       # eta_F
    trace_every: int = Field(10, ge=1)
    fast_trace: bool = True                      # spectral: ghost-norm trace (same value as vmap)
    anchor_weight: float = Field(0.0, ge=0)      # eta_r
    fisher: Literal["empirical", "true"] = "empirical"
    # optimizer and schedule
    optimizer: Literal["sgd", "adam", "sam", "natural_gradient"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    sam_rho: float = Field(0.05, gt=0)
    damping: float = Field(1e-3, gt=0)
    epochs: int = Field(100, ge=1)
    batch_size: Optional[int] = Field(128, ge=1)  # None: the whole validation set each step
    lr_step: Optional[int] = Field(40, ge=1)     # decay the lr by lr_gamma every lr_step epochs
    lr_gamma: float = Field(0.1, gt=0, le=1)
    # Not in the papers (default off): clip each step's gradient norm. SFT's trace term can blow up
    # (README, "What we measured"); clipping bounds its kick.
    max_grad_norm: Optional[float] = Field(None, gt=0)


_SFT = dict(trace_weight=1e-3, trace_every=10, anchor_weight=5.0, optimizer="sgd", lr=0.01,
            epochs=100, lr_step=40, lr_gamma=0.1)
# NGF Algorithm 1: full-batch iterations, the Fisher of the whole validation set at each one (a
# mini-batch empirical Fisher of rank B < #parameters makes the damped solve overshoot).
_NGF = dict(parametrization="last_layer", anchor_weight=0.1, optimizer="natural_gradient", lr=0.01,
            momentum=0.0, epochs=100, lr_step=None, batch_size=None)

PRESETS: dict[str, dict[str, Any]] = {
    "ft": dict(parametrization="full", optimizer="sgd", lr=0.01, epochs=100, lr_step=40, weight_decay=5e-4),
    "ft-sam": dict(parametrization="full", optimizer="sam", lr=0.01, epochs=100, lr_step=40, weight_decay=1e-4,
                   sam_rho=0.05),
    "sft": dict(parametrization="full", **_SFT),
    "fsft": dict(parametrization="spectral", **_SFT),
    "ngf": dict(_NGF),
    # ablations (SFT Table 6, NGF Tables I, V, VI): one term or one choice switched
    "fsft-no-trace": dict(parametrization="spectral", **{**_SFT, "trace_weight": 0.0}),
    "fsft-no-anchor": dict(parametrization="spectral", **{**_SFT, "anchor_weight": 0.0}),
    "ngf-no-anchor": dict(_NGF, anchor_weight=0.0),
    "last-layer-sgd": dict(_NGF, optimizer="sgd", momentum=0.9, batch_size=128),
}


def method_names() -> list[str]:
    return list(PRESETS)


def method_config(name: str, overrides: dict[str, Any] | None = None) -> MethodConfig:
    """The preset ``name`` with ``overrides`` applied, validated."""
    if name not in PRESETS:
        raise SmoothPurifyError(f"unknown purification method {name!r}; choose one of: {', '.join(PRESETS)}")
    try:
        return MethodConfig(name=name, **{**PRESETS[name], **(overrides or {})})
    except ValidationError as err:
        first = err.errors()[0]
        raise SmoothPurifyError(f"method {name}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def make_runner(method: str, overrides: dict[str, Any] | None = None):
    """``(settings, run)`` for a tuning-loop preset or a baseline defense (:mod:`smoothpurify.defenses`).

    ``run(model, inputs, targets, likelihood, **kw)`` returns a ``PurifyResult`` either way; ``kw`` are
    the keyword arguments of :func:`smoothpurify.purify.purify` (classifier, seed, device, evaluate...).
    """
    if method in PRESETS:
        from smoothpurify.purify import purify  # noqa: PLC0415 - purify imports this module

        cfg = method_config(method, overrides)
        return cfg.model_dump(), lambda model, x, y, likelihood, **kw: purify(model, x, y, likelihood, cfg, **kw)
    from smoothpurify.defenses import defense_names, get_defense  # noqa: PLC0415

    if method not in defense_names():
        raise SmoothPurifyError(f"unknown purification method {method!r}; choose one of: "
                                f"{', '.join(list(PRESETS) + defense_names())}")
    defense, options = get_defense(method), dict(overrides or {})
    return {"defense": method, **options}, lambda model, x, y, likelihood, **kw: defense(model, x, y, likelihood,
                                                                                         options, **kw)
