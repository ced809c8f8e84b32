"""The model contract the core relies on: a classifier layer and the features that feed it.

Every model in the project (and any model a user brings) is a plain ``nn.Module``. The core needs
two things from it, obtained in one uniform way for all of them:

* the classifier: the module named by ``model.classifier_name`` if the model declares one,
  else the last ``nn.Linear`` in ``named_modules()`` order, or a name the user gives;
* penultimate features: the input of that classifier, captured by a forward pre-hook, so no
  model has to implement a ``features()`` method.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from smoothpurify import SmoothPurifyError


def classifier_name(model: nn.Module, name: str | None = None) -> str:
    """Qualified name of the classifier layer (see module docstring for the lookup order)."""
    name = name or getattr(model, "classifier_name", None)
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            raise SmoothPurifyError(f"classifier layer {name!r} not found in the model; "
                                    f"layers are: {', '.join(n for n in modules if n)[:300]}")
        return name
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise SmoothPurifyError("the model has no nn.Linear layer; name its classifier explicitly")
    return linears[-1]


def get_classifier(model: nn.Module, name: str | None = None) -> nn.Module:
    return model.get_submodule(classifier_name(model, name))


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Models take one tensor, or a tuple of tensors (e.g. source and target tokens)."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


@torch.no_grad()
def penultimate_features(model: nn.Module, inputs: Any, name: str | None = None) -> torch.Tensor:
    """The classifier's input for ``inputs`` (whatever shape the classifier consumes)."""
    captured: list[torch.Tensor] = []
    layer = get_classifier(model, name)
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        call_model(model, inputs)
    finally:
        handle.remove()
    return captured[-1]
