"""The Modality protocol the core needs, and the registry that finds modalities by name.

Modalities are plugins: each package under ``modalities/`` declares an entry point in the group
``smoothpurify.modalities`` (see pyproject.toml). The CLI, tasks and flows call
:func:`get_modality` with a name; the core never imports a modality.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.likelihood import Likelihood

ENTRY_POINT_GROUP = "smoothpurify.modalities"


@runtime_checkable
class Modality(Protocol):
    """What a modality provides. Data are tensors: ``inputs`` (a tensor or tuple) and ``targets``."""

    name: str
    likelihood: Likelihood

    def prepare_data(self, params: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """Build train / val (clean, held out) / test splits on disk; return metadata (source...)."""

    def load_split(self, data_dir: Path, split: str) -> tuple[Any, torch.Tensor]:
        """Read back one split written by :meth:`prepare_data`: ``(inputs, targets)``."""

    def create_model(self, name: str, **kwargs: Any) -> nn.Module:
        """Model factory; unknown names raise :class:`SmoothPurifyError`."""

    def model_names(self) -> list[str]: ...

    # Optional: ``training_params(params, attack) -> dict``, the part of the params that training
    # ``attack``'s (or "benign") model depends on; the pipeline fingerprints it to skip fresh models.

    def attack_names(self, params: dict[str, Any] | None = None) -> list[str]:
        """Registered attacks, plus the variants ``params`` names (settings of registered ones)."""

    def augment(self, inputs: Any, generator: torch.Generator) -> Any:
        """The training-time augmentation, applied to clean batches during purification (methods with
        ``augment: true``); return ``inputs`` unchanged where the modality has none."""


_REGISTRY: dict[str, Any] = {}


def register_modality(name: str, modality_cls: Any) -> None:
    """Register in-process (tests, notebooks). Installed modalities come from entry points."""
    _REGISTRY[name] = modality_cls


def available_modalities() -> list[str]:
    names = set(_REGISTRY) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def get_modality(name: str) -> Modality:
    if name not in _REGISTRY:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise SmoothPurifyError(
                f"unknown modality {name!r}; installed: {', '.join(available_modalities()) or 'none'}")
        _REGISTRY[name] = found[0].load()
    return _REGISTRY[name]()
