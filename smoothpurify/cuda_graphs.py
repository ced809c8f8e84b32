"""CUDA graphs for the tuning loop: the same kernels, replayed without the host issuing them one by one.

On the paper profile's purification (PreActResNet-18, batches of 128 small images) a GPU step is
bound by the host launching kernels, not by arithmetic: replayed from a captured graph, ft's step took
3.9 ms against 7.2 ms eager and f-SFT's non-trace step 6.3 ms against 17.9 ms (H200; README, "The fast
GPU path"). Two standard means, both only on CUDA (:attr:`smoothpurify.accel.Accel.graphs`):

* :class:`GraphedRunner`: the model's forward and backward from :func:`torch.cuda.make_graphed_callables`,
  one pair of graphs per input shape (the epoch's last, shorter batch gets its own). The loss, the
  objective's other terms and the optimizer stay eager, so a learning-rate schedule, SAM's two passes
  and the deferred finiteness checks work unchanged. Valid when every forward through it is followed
  by its backward before the next forward (the caller's job: one NLL forward per objective call).
* :class:`CapturedStep`: a whole function of one batch ``(x, y)`` captured once per shape (warm-up
  on a side stream, then :class:`torch.cuda.CUDAGraph`): a step whose objective draws nothing at
  random (forward, every term, gradients; :func:`~smoothpurify.tuning_step.plain_step`), and f-SFT's
  fused trace step (forward, ghost-norm backward with graph, double backward, anchor gradient). The
  function must not read a device value on the host (no ``float(tensor)``). Where the objective
  draws at random on the host (overlays, mixup partners), only the model runs from graphs
  (:class:`GraphedRunner`).

Neither changes the math: a replay computes what the eager step computes (a captured step takes the
anchor's gradient in closed form and keeps the trace's step bound on the device; both tested equal to
float tolerance, and the whole loop with graphs against without on a GPU).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

# Whether a step whose objective draws nothing at random is captured whole (:class:`CapturedStep`:
# forward, every term, backward) rather than through :class:`GraphedRunner` (forward and backward only);
# False is the benchmark's comparison.
CAPTURE_WHOLE_STEP = True

# At most this many input shapes get graphs (a shuffled pass has two: full batches and the last one);
# any further shape runs eagerly instead of holding more graph memory.
MAX_SHAPES = 2


def _key(tensors: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


class _Shell(nn.Module):
    """A fresh module around ``inner`` for make_graphed_callables to rewrite (it replaces the
    forward of the module it is given), so ``inner`` itself keeps its eager forward."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> Any:
        return self.inner(*args)


class GraphedRunner(nn.Module):
    """``module``'s forward and backward replayed from CUDA graphs while it trains with gradients on;
    anything else (evaluation, no grad, CPU tensors, non-tensor inputs, a third input shape) runs
    ``module`` eagerly. The graphs are captured on the first call with a new shape; the warm-up
    passes make_graphed_callables runs first would update batch-norm statistics, so every buffer
    (and the CUDA generator) is restored after capture: the training sees only its own steps."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self._graphed: dict[tuple, nn.Module | None] = {}
        self.captures = 0

    def _eligible(self, args: tuple) -> bool:
        return (torch.is_grad_enabled() and self.module.training and len(args) > 0
                and all(isinstance(a, torch.Tensor) and a.is_cuda and not a.requires_grad for a in args))

    def forward(self, *args: Any) -> Any:
        if not self._eligible(args):
            return self.module(*args)
        key = _key(args)
        if key not in self._graphed:
            if len(self._graphed) >= MAX_SHAPES:
                return self.module(*args)
            self._graphed[key] = self._capture(args)
        graphed = self._graphed[key]
        return self.module(*args) if graphed is None else graphed(*args)

    def _capture(self, args: tuple) -> nn.Module | None:
        """The graphed shell for ``args``' shape, or None (with a warning) where capture fails."""
        buffers = [(b, b.detach().clone()) for b in self.module.buffers()]
        rng = torch.cuda.get_rng_state(args[0].device)
        shell = _Shell(self.module)
        sample = tuple(a.detach().clone() for a in args)  # clone keeps the memory format
        try:
            with warnings.catch_warnings():
                # The warm-up's backward runs on a side stream while the parameters' gradient
                # accumulators were made on the default one: torch warns of a possible sync, once.
                warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream")
                graphed = torch.cuda.make_graphed_callables(shell, sample, allow_unused_input=True)
            self.captures += 1
        except (RuntimeError, AssertionError) as err:
            warnings.warn(f"{type(self.module).__name__}: runs eagerly (CUDA graph capture failed: {err})",
                          RuntimeWarning, stacklevel=3)
            graphed = None
        finally:
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)
            torch.cuda.set_rng_state(rng, args[0].device)
        return graphed


class CapturedStep:
    """``fn(x, y)`` replayed from one CUDA graph per input shape; returns ``fn``'s outputs as static
    tensors that the next replay overwrites (the caller consumes or clones them first).

    ``fn`` runs eagerly ``warmup`` times on a side stream before capture (lazy initialisation of
    cuBLAS / cuDNN must not land in the graph); ``module``'s buffers (batch-norm statistics a
    training-mode forward updates) and the CUDA generator are restored after the warm-up, so ``fn``
    must have no other side effect than its outputs and those. An exception during warm-up or capture
    is re-raised and the caller falls back to eager."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], Any], module: nn.Module | None = None,
                 warmup: int = 2):
        self.fn, self.module, self.warmup = fn, module, warmup
        self._graphs: dict[tuple, tuple] = {}
        self.captures = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        key = _key((x, y))
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= MAX_SHAPES:
                return self.fn(x, y)
            entry = self._graphs[key] = self._capture(x, y)
        static_x, static_y, graph, outputs = entry
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return outputs

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        static_x, static_y = x.detach().clone(), y.detach().clone()
        buffers = [(b, b.detach().clone()) for b in self.module.buffers()] if self.module is not None else []
        rng = torch.cuda.get_rng_state(x.device)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(static_x, static_y)
        finally:
            torch.cuda.current_stream(x.device).wait_stream(side)
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)
            torch.cuda.set_rng_state(rng, x.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(static_x, static_y)
        self.captures += 1
        return static_x, static_y, graph, outputs
