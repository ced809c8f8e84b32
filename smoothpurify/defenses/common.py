"""What the baseline defenses share: option handling, clean accuracy, batching, timing, the record.

Every defense sees only the backdoored model and the clean validation set. Hyper-parameters are
never chosen with poisoned data: where a defense must pick something (FP's pruning depth, ANP's
pruning count, MCR's point on the curve) it looks at clean validation accuracy only, and
``evaluate`` (test ACC/ASR) is called for reporting after the choice is made.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from smoothpurify import NonFiniteLoss, SmoothPurifyError
from smoothpurify.metrics import correct, model_accuracy as accuracy  # noqa: F401 - defenses import them here
from smoothpurify.model import call_model
from smoothpurify.purify import PurifyResult
from smoothpurify.training import index_inputs, num_samples, to_device

Evaluate = Callable[[nn.Module], dict[str, float]]


def resolve_options(name: str, options: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``options``; an unknown key is a one-line error, not a silent no-op."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise SmoothPurifyError(f"defense {name}: unknown option(s) {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(defaults))}")
    out = copy.deepcopy(defaults)
    for key, value in options.items():
        out[key] = {**out[key], **(value or {})} if isinstance(out[key], dict) else value
    return out


def check_clean_set(name: str, targets: torch.Tensor) -> None:
    if len(targets) == 0:
        raise SmoothPurifyError(f"defense {name}: the clean validation set is empty")
    if targets.dim() == 1 and not targets.is_floating_point() and targets.unique().numel() < 2:
        raise SmoothPurifyError(f"defense {name}: the clean validation set has a single class")


def batches(inputs: Any, targets: torch.Tensor, batch_size: int,
            generator: torch.Generator | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
    """Mini-batches in a random order when ``generator`` is given, else in order."""
    n = num_samples(inputs)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for idx in order.split(batch_size):
        yield index_inputs(inputs, idx.to(targets.device)), targets[idx.to(targets.device)]


def sample_batch(inputs: Any, targets: torch.Tensor, batch_size: int,
                 generator: torch.Generator) -> tuple[Any, torch.Tensor]:
    """One batch drawn with replacement (ANP and AWM sample iterations, not epochs)."""
    idx = torch.randint(num_samples(inputs), (batch_size,), generator=generator).to(targets.device)
    return index_inputs(inputs, idx), targets[idx]


def mean_nll(model: nn.Module, likelihood: Any, x: Any, y: torch.Tensor) -> torch.Tensor:
    return likelihood.nll(call_model(model, x), y).mean()


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor, defense: str, where: str, hint: str) -> float:
    """One optimiser step on ``loss``; a non-finite loss stops the defense with one clear line."""
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"defense {defense}: loss became {float(loss)} at {where}; {hint}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def working_copy(model: nn.Module, device: str, inputs: Any, targets: torch.Tensor):
    """A deep copy of the model on ``device`` (the caller's model is never modified) and the data there."""
    return copy.deepcopy(model).to(device), to_device(inputs, device), targets.to(device)


def into_original(original: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh copy of ``original`` (same classes, same state-dict keys in the same order) holding
    ``state``: whatever a defense wrapped or masked on the way, the output has the input's form."""
    out = copy.deepcopy(original).cpu()
    keys = list(out.state_dict())
    if set(keys) != set(state):
        missing, extra = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
        raise SmoothPurifyError(f"internal: purified state does not match the architecture "
                                f"(missing {missing[:3]}, extra {extra[:3]})")
    out.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    for p in out.parameters():
        p.requires_grad_(True)
    return out.eval()


class Clock:
    """Wall seconds split as the tuning loop does: setup, tuning, and reporting (excluded)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.setup = 0.0
        self._mark = self.start
        self.excluded = 0.0

    def end_setup(self) -> None:
        now = time.perf_counter()
        self.setup = now - self.start - self.excluded
        self.excluded = 0.0
        self._mark = now

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def seconds(self) -> dict[str, float]:
        tuning = time.perf_counter() - self._mark - self.excluded
        return {"setup": round(self.setup, 3), "tuning": round(tuning, 3), "total": round(self.setup + tuning, 3)}


class Curves:
    """Test metrics every ``eval_every`` epochs (reporting only; their time is excluded)."""

    def __init__(self, evaluate: Evaluate | None, eval_every: int | None, clock: Clock) -> None:
        self.evaluate, self.every, self.clock, self.rows = evaluate, eval_every, clock, []

    def __call__(self, model: nn.Module, epoch: int, last: int, **extra: float) -> None:
        if self.evaluate is None or not self.every or (epoch % self.every and epoch != last):
            return
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        self.rows.append({"epoch": epoch, **extra, **self.evaluate(model)})
        model.train(was_training)
        self.clock.exclude(time.perf_counter() - t0)


def finish(name: str, original: nn.Module, state: dict[str, torch.Tensor], clock: Clock, opts: dict[str, Any],
           seed: int, evaluate: Evaluate | None, curves: Curves | list[dict[str, Any]] | None = None,
           val: tuple[Any, torch.Tensor] | None = None, **details: Any) -> PurifyResult:
    """The defense's result: a model with the original architecture and the record the pipeline
    writes (``seconds``, the resolved options, defense details, clean validation accuracy of the
    result when ``val`` is given, ``metrics`` when asked)."""
    seconds = clock.seconds()
    model = into_original(original, state)
    record: dict[str, Any] = {"method": name, "defense": name, "config": opts, "seed": seed,
                              "seconds": seconds, **details}
    if val is not None:
        record["val_acc"] = accuracy(model.to(val[1].device), *val)
        model.cpu()
    rows = curves.rows if isinstance(curves, Curves) else curves
    if rows:
        record["curves"] = rows
    if evaluate is not None:
        record["metrics"] = evaluate(model)
    return PurifyResult(model, record)


def finetune(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any, overrides: dict[str, Any], *,
             seed: int, device: str, progress: bool, evaluate: Evaluate | None = None,
             eval_every: int | None = None, augment: Any = None) -> PurifyResult:
    """Vanilla fine-tuning through the core tuning loop (the ``ft`` preset with ``overrides``)."""
    from smoothpurify.methods import method_config
    from smoothpurify.purify import purify

    return purify(model, inputs, targets, likelihood, method_config("ft", overrides), seed=seed, device=device,
                  evaluate=evaluate, eval_every=eval_every, progress=progress, augment=augment)
