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


# ----------------------------------------------------------------------------- layer resolution
# Baseline defenses (smoothpurify.defenses) need more of the architecture than the classifier:
# conv layers, normalisation layers, which BN normalises which conv. Everything below is found
# from module types, module order or one traced forward pass, never from layer names, so any
# network the user brings works the same way as ours.

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv1d/2d/3d (not transposed) in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CONV_TYPES)]


def last_conv_name(model: nn.Module) -> str:
    """The last conv layer before the classifier, by module order."""
    convs = conv_layers(model)
    if not convs:
        raise SmoothPurifyError("the model has no convolution layer (this defense prunes conv channels)")
    return convs[-1][0]


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm layers with learnable affine parameters (the 'neurons' of ANP / CLP), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BATCHNORM_TYPES) and m.affine]


def conv_bn_pairs(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` for every BatchNorm that normalises a conv's output directly.

    With ``example_inputs`` one forward pass is traced and a BN is paired with a conv only if the
    BN's input *is* the conv's output tensor: exact for any wiring (in pre-activation ResNets the
    BN after a residual sum has no conv of its own and is left out). Only the input's shape
    matters, so callers that must stay data-free can pass zeros. Without it the BN is paired
    with the most recent conv in module order whose ``out_channels`` equals ``num_features``
    (right for conv -> BN stacks, a heuristic for anything else).
    """
    convs = dict(conv_layers(model))
    norms = dict(norm_layers(model))
    if example_inputs is None:
        pairs, last = [], None
        for name, module in model.named_modules():
            if name in convs:
                last = name
            elif name in norms and last is not None and convs[last].out_channels == module.num_features:
                pairs.append((last, name))
                last = None  # one BN per conv
        return pairs
    produced: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # hold outputs so their ids cannot be reused during the pass
    pairs_traced: dict[str, str] = {}
    handles = []

    def conv_hook(name):
        def hook(_m, _args, out):
            keep.append(out)
            produced[id(out)] = name
        return hook

    def bn_hook(name):
        def hook(_m, args):
            source = produced.get(id(args[0]))
            if source is not None and name not in pairs_traced:
                pairs_traced[name] = source
        return hook

    for name, module in convs.items():
        handles.append(module.register_forward_hook(conv_hook(name)))
    for name, module in norms.items():
        handles.append(module.register_forward_pre_hook(bn_hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [(conv, bn) for bn, conv in pairs_traced.items()]


def feature_stages(model: nn.Module, count: int = 3) -> list[str]:
    """Names of the last ``count`` modules that form the network's feature stages (NAD's layers).

    A stage is a child module that contains a conv. Starting at the root, while fewer than
    ``count`` children contain convs and exactly one does, descend into it (a ``features``
    Sequential). WRN-16-1 gives ``block1..3`` (NAD's choice), PreActResNet-18 ``layer2..4``, a
    plain conv stack its last ``count`` convs.
    """
    def has_conv(m: nn.Module) -> bool:
        return isinstance(m, CONV_TYPES) or any(isinstance(s, CONV_TYPES) for s in m.modules())

    prefix, module = "", model
    while True:
        stages = [(n, c) for n, c in module.named_children() if has_conv(c)]
        if len(stages) == 1 and not isinstance(stages[0][1], CONV_TYPES) and count > 1:
            prefix, module = f"{prefix}{stages[0][0]}.", stages[0][1]
            continue
        break
    if not stages:
        raise SmoothPurifyError("the model has no convolution layer to take attention maps from")
    return [prefix + n for n, _ in stages[-count:]]
