"""How a tuning or training loop runs on its device: the standard speed-ups of a GPU, none on a CPU.

One :class:`Accel` says, for one loop on one device:

* ``autocast``: the dtype of the mixed-precision forward (``torch.autocast``) or ``None``. The NLL,
  the distillation and feature-shift terms tolerate bfloat16 (losses and reductions stay float32
  under autocast); the Fisher terms (the trace, its step bound, the diagonal of the anchor) and the
  natural gradient's solve do not, so they always run in float32 (:func:`full_precision`).
* ``channels_last``: 4-d inputs and the model's 4-d weights in NHWC memory order, which the GPU's
  convolution kernels prefer. The purified model is handed back in the default order (safetensors
  stores contiguous tensors only).
* ``defer_checks``: the loop keeps its per-step numbers (loss parts, the finiteness check) on the
  device and looks at them once per epoch, instead of waiting for the device at every step.
* ``graphs``: CUDA graphs (:mod:`smoothpurify.cuda_graphs`): the model's forward and backward, and
  f-SFT's fused trace step, replayed instead of launched kernel by kernel (on CUDA in ``auto`` and
  ``fp32``; not with autocast or ``compile``; :data:`CUDA_GRAPHS` = False turns them off).
* ``compile``: ``torch.compile`` the module the loop calls (off unless asked: it pays only when a
  run is much longer than the compilation; ft's 100 epochs took 43.6 s compiled, 6.1 s not, H200).

``precision`` is the user's choice: ``"auto"`` (channels_last + deferred checks + graphs on CUDA, float32;
nothing on a CPU, so CPU results are the reference path's to the bit), ``"fp32"`` (the same) or
``"bf16"`` (autocast on top, on any device that supports it). Autocast is not in ``"auto"``: on the
paper profile's purification (PreActResNet-18, batches of 128 28x28 images) a step is bound by
the host launching kernels, not by arithmetic, and autocast adds cast kernels; it made every method
slower on an H200 (ft 6.1 s vs 5.6 s, sft 29.2 s vs 19.7 s; README, "The fast GPU path"). It pays
where a step is compute-bound (large inputs or batches): pass ``bf16`` there.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from smoothpurify import NonFiniteLoss, SmoothPurifyError

PRECISIONS = ("auto", "fp32", "bf16")

# Whether ``auto`` / ``fp32`` let cuDNN time its algorithms per shape on CUDA (``cudnn.benchmark``,
# inside the tuning steps only); off until measured to pay (README, "The fast GPU path").
CUDNN_BENCHMARK = False

# Whether ``auto`` / ``fp32`` use CUDA graphs on CUDA; False gives the eager GPU path (the benchmark's
# comparison). Users turn them off with the environment variable SMOOTHPURIFY_CUDA_GRAPHS=0: each
# captured step keeps its own activations (up to three sets: two batch shapes and f-SFT's trace step),
# which a large model on a small GPU may not afford.
CUDA_GRAPHS = True


def graphs_wanted() -> bool:
    return CUDA_GRAPHS and os.environ.get("SMOOTHPURIFY_CUDA_GRAPHS", "1").strip() != "0"


@dataclass(frozen=True)
class Accel:
    device_type: str = "cpu"
    autocast: torch.dtype | None = None
    channels_last: bool = False
    defer_checks: bool = False
    compile: bool = False
    graphs: bool = False
    cudnn_benchmark: bool = False

    def autocast_context(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast)

    def step_context(self) -> contextlib.AbstractContextManager:
        """Around one step: autocast, and cuDNN's per-shape algorithm search when asked."""
        if not self.cudnn_benchmark:
            return self.autocast_context()
        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast_context())
        stack.enter_context(torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled, benchmark=True,
            deterministic=torch.backends.cudnn.deterministic, allow_tf32=torch.backends.cudnn.allow_tf32))
        return stack

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` with its 4-d weights in channels_last order, when asked (in place, returned)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def inputs(self, inputs: Any) -> Any:
        """Image batches (4-d floating-point tensors) in channels_last order, when asked."""
        if not self.channels_last:
            return inputs
        if isinstance(inputs, (tuple, list)):
            return type(inputs)(self.inputs(t) for t in inputs)
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 4 and inputs.is_floating_point():
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def callable(self, module: nn.Module) -> nn.Module:
        return torch.compile(module) if self.compile else module


# The reference path: what every loop did before there was an Accel, and what a CPU always gets.
REFERENCE = Accel()


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise SmoothPurifyError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def resolve_accel(precision: str, device: str | torch.device, *, compile: bool = False) -> Accel:
    """The :class:`Accel` for ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    check_precision(precision)
    device_type = torch.device(device).type
    cuda = device_type == "cuda"
    if precision == "bf16" and not cuda and device_type != "cpu":
        raise SmoothPurifyError(f"precision bf16: autocast is supported on cuda and cpu, not {device_type}")
    dtype = torch.bfloat16 if precision == "bf16" else None
    return Accel(device_type=device_type, autocast=dtype, channels_last=cuda, defer_checks=cuda,
                 compile=compile, graphs=cuda and graphs_wanted() and dtype is None and not compile,
                 cudnn_benchmark=cuda and CUDNN_BENCHMARK)


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Float32 inside, whatever autocast is active outside (the Fisher terms need it)."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


class FiniteGuard:
    """Checks that losses stay finite: at once (reference path), or on the device with one look
    per epoch (:attr:`Accel.defer_checks`), reporting the first bad step and its value."""

    def __init__(self, defer: bool, what: str, hint: str):
        self.defer, self.what, self.hint = defer, what, hint
        self._pending: list[tuple[torch.Tensor, str]] = []

    def _fail(self, value: float, where: str) -> None:
        raise NonFiniteLoss(f"{self.what}: loss became {value} at {where}; {self.hint}")

    def check(self, loss: torch.Tensor, where: str) -> None:
        if self.defer:
            self._pending.append((loss.detach().reshape(()), where))
        elif not torch.isfinite(loss):
            self._fail(loss.item(), where)

    def flush(self) -> None:
        """Raise for the first non-finite loss since the last flush (one device sync)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.stack([v for v, _ in pending])
        bad = torch.isfinite(values).logical_not().nonzero()
        if len(bad):
            first = int(bad[0])
            self._fail(values[first].item(), pending[first][1])
