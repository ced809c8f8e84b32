"""What is tuned: ``full``, ``spectral`` (f-SFT) or ``last_layer`` (NGF).

The parametrization is one of the three independent choices every purification method is made
of (docs/architecture.md); the objective and the optimizer only ever see ``Tuned.named_tuned()``.

* ``full``: every parameter (SFT, vanilla FT, FT-SAM).
* ``spectral``: f-SFT (SFT paper §5.1, Eq. 7). Every Conv1d/2d/3d, Linear and attention projection
  weight becomes ``W = U diag(relu(s + delta)) V^T`` with ``U, s, V`` from one SVD at wrap time
  (a conv weight reshaped to ``out x (in/groups * k...)``) and only ``delta`` (zeros) trainable.
  Built on :mod:`torch.nn.utils.parametrize`, so the wrapped model is still the user's module.
  While gradients are on, a wrapped Linear/Conv layer whose factors are cheap enough runs
  *factored*, ``z = (U diag(relu(s + delta))) (Vh a)`` (:meth:`SpectralShift.factored`): the same
  map with ``W`` never built, and backward then needs no weight-gradient convolution (``U, Vh``
  are frozen): ``d/d sigma_i = sum_t (u_i^T dz_t)(Vh a)_{i,t}`` comes from the small product with
  ``U``. Without gradients (evaluation) the layer reads the rebuilt ``W`` once per call, as before.
* ``last_layer``: only the classifier (NGF); the backbone is frozen for real (no gradients,
  every backbone module in eval mode) so its features can be computed once and cached.

``Tuned.merge()`` writes the tuned weights back into a plain module with the original
architecture and state-dict keys, which is what the purified checkpoint stores.
"""
from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize as P

from smoothpurify import SmoothPurifyError
from smoothpurify.model import classifier_name

MODES = ("full", "spectral", "last_layer")

# Layers whose running statistics or affine parameters make them "normalisation" layers; frozen
# ones are kept in eval mode so fine-tuning on a few hundred clean samples cannot drift their
# running statistics (which would change the model without any tuned parameter moving).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

# Transposed convolutions are _ConvNd too but their weight is (in, out/groups, k...): left out.
SPECTRAL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_MHA_BIASES = ("in_proj_bias",)
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PLAIN_FORWARDS = tuple(cls.forward for cls in SPECTRAL_LAYERS)  # subclasses with their own forward: not factored

# Default of ``prepare(..., factored=None)``: run wrapped Linear/Conv layers factored while
# gradients are on (module docstring). False gives the plain parametrization everywhere (the
# reference path the factored one is tested against).
FACTORED = True


class SpectralShift(nn.Module):
    """``W = U diag(relu(s + delta)) Vh`` reshaped to the original weight shape.

    The input the parametrization receives (the original weight) is ignored on purpose: the SVD
    is taken once at wrap time (f-SFT keeps singular vectors frozen), so ``U, s, Vh`` are buffers
    and ``delta`` is the only parameter. With ``delta = 0`` the reconstruction equals ``W`` to
    float tolerance; the SVD runs in float64 so that tolerance is the storage dtype's.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.shape = tuple(weight.shape)
        mat = weight.detach().reshape(self.shape[0], -1).to(torch.float64)
        # Layer-sized SVDs gain nothing from threads, and LAPACK's threads spin badly on a busy
        # 2-core machine (0.07 s on one thread vs 5 s on two for a 128 x 3136 matrix, measured).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        finally:
            torch.set_num_threads(threads)
        dtype = weight.dtype
        self.register_buffer("U", u.to(dtype))
        self.register_buffer("s", s.to(dtype))
        self.register_buffer("Vh", vh.to(dtype))
        self.delta = nn.Parameter(torch.zeros_like(self.s))
        # Set to a list by the Fisher code's ghost-norm path: every factored call appends
        # ``(layer, Vh a)`` (spectral_trace._fast_per_sample_grads).
        self.record: list | None = None

    def singular_values(self) -> torch.Tensor:
        return torch.relu(self.s + self.delta)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return ((self.U * self.singular_values()) @ self.Vh).reshape(self.shape)

    def factored(self, layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """``layer(inputs)`` for the Linear/Conv ``layer`` whose weight this is, computed as
        ``(U diag(relu(s + delta))) (Vh a) + b`` without building ``W``: a convolution with the
        rows of ``Vh`` as filters (the layer's stride, padding, dilation and padding mode; with
        groups, every group gets all ``r`` filters, as ``W``'s rows of group ``k`` see only input
        group ``k``), then a matrix product over channels with the scaled ``U`` (small, so the
        scale costs nothing on the activations; a matmul, several times faster than a 1x1
        convolution on CPU; measured faster than one large matmul over channels x (batch,
        positions), which needs two transposed copies). Batched inputs only (the caller checks)."""
        rank = self.s.numel()
        u = self.U * self.singular_values()
        if isinstance(layer, nn.Linear):
            h = F.linear(inputs, self.Vh)
            if self.record is not None:
                self.record.append((layer, h))
            return F.linear(h, u, layer.bias)
        groups, nd, out = layer.groups, len(self.shape) - 2, self.shape[0]
        filters = self.Vh.reshape(rank, *self.shape[1:])
        if groups > 1:
            filters = filters.repeat(groups, *([1] * (nd + 1)))
        original = layer.parametrizations.weight.original
        if nd == 2 and original.is_contiguous(memory_format=torch.channels_last) and not original.is_contiguous():
            # The model was put in channels_last (the GPU path). Filters rebuilt from Vh are NCHW, and a
            # 1-channel input's layout is ambiguous, so without this the convolution would follow the
            # filters and every later layer would run NCHW.
            filters = filters.contiguous(memory_format=torch.channels_last)
        h = layer._conv_forward(inputs, filters, None)
        if self.record is not None:
            self.record.append((layer, h))
        b, spatial = h.shape[0], h.shape[2:]
        if groups == 1 and nd == 2 and h.is_contiguous(memory_format=torch.channels_last) and \
                not h.is_contiguous():
            # channels_last (the GPU path): channels are the fastest dimension, so the product over
            # channels is one (batch x positions, r) @ (r, out) matmul on views, and z comes out
            # channels_last too; the NCHW product below would first copy h.
            z = (h.permute(0, 2, 3, 1) @ u.transpose(0, 1)).permute(0, 3, 1, 2)
            return z if layer.bias is None else z + layer.bias.reshape(-1, 1, 1)
        z = u.reshape(groups, out // groups, rank) @ h.reshape(b, groups, rank, -1)
        z = z.reshape(b, out, *spatial)
        return z if layer.bias is None else z + layer.bias.reshape(-1, *([1] * nd))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, rank={self.s.numel()}"


@dataclass
class Tuned:
    """A model prepared for tuning. Call :meth:`train` (not ``model.train()``) in training loops,
    or :meth:`frozen_norm_eval` after an external ``model.train()``."""

    model: nn.Module
    mode: str
    classifier: str | None = None
    eval_modules: tuple[str, ...] = ()  # modules that stay in eval mode while tuning
    _anchor: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _param_order: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def named_tuned(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def anchor(self) -> dict[str, torch.Tensor]:
        """Start values ``thetabar`` of the tuned parameters (delta = 0 for spectral), for ``L_r``.

        Moved to each parameter's current device, so a later ``model.to(device)`` is harmless.
        """
        tuned = self.named_tuned()
        return {n: a.to(tuned[n].device) if n in tuned else a for n, a in self._anchor.items()}

    def frozen_norm_eval(self) -> Tuned:
        """Put the frozen normalisation layers (and, for last_layer, the whole backbone) back in
        eval mode; per module, not recursively, so the tuned modules keep their own mode."""
        for name in self.eval_modules:
            self.model.get_submodule(name).training = False
        return self

    def train(self, mode: bool = True) -> Tuned:
        self.model.train(mode)
        return self.frozen_norm_eval()

    def eval(self) -> Tuned:
        return self.train(False)

    def merge(self) -> nn.Module:
        """A plain module (original classes and state-dict keys) holding the tuned weights."""
        merged = bake_parametrizations(self.model, self._param_order)
        for p in merged.parameters():
            p.requires_grad_(True)
            p.grad = None
        merged.train(self.model.training)
        return merged


def bake_parametrizations(model: nn.Module, param_order: dict[str, list[str]] | None = None) -> nn.Module:
    """A deep copy of ``model`` with every parametrization replaced by the tensor it computes.

    Equivalent to ``remove_parametrizations(leave_parametrized=True)`` on a deep copy, done by
    hand because that function deletes the property from the *class*, which the deep copy shares
    with ``model`` (``model`` would lose its weights). Weights tied before wrapping share one
    original tensor and come out as one shared parameter again. ``param_order`` (module name ->
    parameter names) restores the unwrapped model's state-dict key order.
    """
    merged = copy.deepcopy(model)
    replaced: dict[int, torch.Tensor] = {}
    for name, module in list(merged.named_modules()):
        if not P.is_parametrized(module):
            continue
        values = {}
        with torch.no_grad():
            for tensor_name, plist in module.parametrizations.items():
                original = getattr(plist, "original", plist)
                if id(original) not in replaced:
                    value = getattr(module, tensor_name).detach().clone()
                    is_param = isinstance(original, nn.Parameter) or original is plist
                    replaced[id(original)] = nn.Parameter(value) if is_param else value
                values[tensor_name] = replaced[id(original)]
        module.__class__ = P.type_before_parametrizations(module)
        if runs_factored(module):
            del module.__dict__["forward"]
        del module._modules["parametrizations"]
        for tensor_name, value in values.items():
            if isinstance(value, nn.Parameter):
                module.register_parameter(tensor_name, value)
            else:
                module.register_buffer(tensor_name, value)
        own = module._parameters
        for key in (param_order or {}).get(name, []):
            if key in own:
                own[key] = own.pop(key)
    return merged


def _factored_forward(self: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Instance ``forward`` of a wrapped Linear/Conv layer: factored while gradients are on."""
    plist = self.parametrizations.weight
    batched = isinstance(self, nn.Linear) or inputs.dim() == len(plist[0].shape)
    if torch.is_grad_enabled() and batched and len(plist) == 1 and isinstance(plist[0], SpectralShift):
        return plist[0].factored(self, inputs)
    return type(self).forward(self, inputs)


def runs_factored(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _factored_forward


def _factoring_pays(layer: nn.Module, shift: SpectralShift) -> bool:
    """Multiply-adds per output position: factored ``r * in * k + out * r`` (forward; its backward
    is about the same again) against ``out * in/groups * k`` for ``W`` (forward, then the same twice
    in backward: input and weight gradients). Depthwise convolutions, say, stay unfactored."""
    out, rank = shift.shape[0], shift.s.numel()
    fan_in = 1
    for d in shift.shape[1:]:
        fan_in *= d  # in/groups * k
    groups = getattr(layer, "groups", 1)
    factored = rank * groups * fan_in + out * rank
    return 2 * factored <= 3 * out * fan_in


def spectral_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(module name, module, tensor name)`` of every weight f-SFT wraps, in module order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, SPECTRAL_LAYERS) and isinstance(module.weight, torch.Tensor):
            found.append((name, module, "weight"))
        elif isinstance(module, nn.MultiheadAttention):
            # out_proj is an nn.Linear submodule and is found on its own.
            for attr in _MHA_WEIGHTS:
                if getattr(module, attr, None) is not None:
                    found.append((name, module, attr))
    return found


def _wrap_spectral(model: nn.Module, factored: bool = True) -> None:
    """Register one SpectralShift per distinct weight tensor.

    A tensor shared by several modules (tied embedding / output projection) gets the SAME
    SpectralShift registered on every owner, including owners that are not spectral layers
    (an ``nn.Embedding``), so the tie survives: all of them read ``W(delta)``. With ``factored``,
    each Linear/Conv owner of a ``weight`` where it pays (:func:`_factoring_pays`) gets the
    instance ``forward`` :func:`_factored_forward` (removed again by :func:`bake_parametrizations`).
    """
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, attr))
    done: set[int] = set()
    for _, module, attr in spectral_layers(model):
        weight = getattr(module, attr)
        if id(weight) in done or isinstance(weight, nn.parameter.UninitializedParameter):
            continue
        done.add(id(weight))
        shift = SpectralShift(weight).to(weight.device)
        for owner, owner_attr in owners.get(id(weight), [(module, attr)]):
            P.register_parametrization(owner, owner_attr, shift)
            if (factored and owner_attr == "weight" and isinstance(owner, SPECTRAL_LAYERS)
                    and P.type_before_parametrizations(owner).forward in _PLAIN_FORWARDS
                    and _factoring_pays(owner, shift)):
                owner.forward = types.MethodType(_factored_forward, owner)


def _is_bias(module: nn.Module, attr: str) -> bool:
    if isinstance(module, SPECTRAL_LAYERS):
        return attr == "bias"
    return isinstance(module, nn.MultiheadAttention) and attr in _MHA_BIASES


def prepare(model: nn.Module, mode: str, classifier: str | None = None, tune_bias: bool = False,
            tune_norm: bool = False, inplace: bool = False, factored: bool | None = None) -> Tuned:
    """Wrap ``model`` for tuning in ``mode`` (see module docstring).

    ``tune_bias`` / ``tune_norm`` only matter for ``spectral`` (f-SFT freezes biases and
    normalisation layers by default, SFT paper §5.1); ``full`` tunes everything and ``last_layer``
    tunes the classifier's weight and bias only. The caller's model is deep-copied unless
    ``inplace``, so it stays available as the "before" model. ``factored`` (default
    :data:`FACTORED`): spectral layers run factored while gradients are on (module docstring).
    """
    if mode not in MODES:
        raise SmoothPurifyError(f"unknown parametrization {mode!r}; choose one of {', '.join(MODES)}")
    if not inplace:
        model = copy.deepcopy(model)
    head = classifier_name(model, classifier) if (mode == "last_layer" or classifier) else None
    eval_modules: list[str] = []

    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif mode == "last_layer":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_submodule(head).parameters():
            p.requires_grad_(True)
        # The backbone's own training flag matters too (BN statistics, dropout): NGF caches
        # penultimate features, which is only valid if the backbone is deterministic.
        eval_modules = [n for n, _ in model.named_modules()
                        if not (n == head or n.startswith(head + "."))]
    else:
        if not spectral_layers(model):
            raise SmoothPurifyError("spectral parametrization found no Conv/Linear/attention weight")
        for p in model.parameters():
            p.requires_grad_(False)
        order = {n: list(m._parameters) for n, m in model.named_modules()}
        _wrap_spectral(model, FACTORED if factored is None else factored)
        for name, module in model.named_modules():
            if isinstance(module, SpectralShift):
                module.delta.requires_grad_(True)
            for attr, p in module._parameters.items():
                if p is None:
                    continue
                if tune_bias and _is_bias(module, attr):
                    p.requires_grad_(True)
                if tune_norm and isinstance(module, NORM_TYPES):
                    p.requires_grad_(True)
            if isinstance(module, NORM_TYPES) and not any(
                    p.requires_grad for p in module.parameters(recurse=False)):
                eval_modules.append(name)

    tuned = Tuned(model=model, mode=mode, classifier=head, eval_modules=tuple(eval_modules),
                  _param_order=order if mode == "spectral" else {})
    tuned._anchor = {n: p.detach().clone() for n, p in tuned.named_tuned().items()}
    if not tuned._anchor:
        raise SmoothPurifyError(f"parametrization {mode!r} left nothing to tune")
    return tuned.train(model.training)
