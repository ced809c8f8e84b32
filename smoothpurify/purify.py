"""The one tuning loop every purification method uses (parametrization x objective x optimizer).

``purify(model, inputs, targets, likelihood, config)`` fine-tunes a copy of ``model`` on the clean
validation set and returns the purified plain model (original architecture) with a record:
settings, wall seconds split into setup (SVD, Fisher diagonal, feature cache) and tuning,
per-epoch validation loss, and metrics when an ``evaluate`` callback is given. Nothing here looks at
poisoned data: ``evaluate`` is for reporting only and never steers the run.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from smoothpurify import SmoothPurifyError
from smoothpurify.accel import FiniteGuard, resolve_accel
from smoothpurify.cuda_graphs import CapturedStep, GraphedRunner
from smoothpurify import cuda_graphs
from smoothpurify.fisher import fisher_diagonal, fisher_trace
from smoothpurify.spectral_trace import spectral_fisher_trace
from smoothpurify.likelihood import Likelihood
from smoothpurify.metrics import model_accuracy
from smoothpurify.methods import MethodConfig
from smoothpurify.model import call_model, classifier_name, penultimate_features
from smoothpurify.objective import Objective, Overlay
from smoothpurify.optim import make_optimizer
from smoothpurify.parametrize import prepare
from smoothpurify.training import index_inputs, num_samples, to_device
from smoothpurify.unlearn import (BudgetedFamily, InversionSettings, TriggerViews, chosen_families, invert_triggers,
                                  search_epochs)
from smoothpurify.tuning_step import BatchClosure, floats, fused_trace, fuses_trace, mean_of, plain_step

Evaluate = Callable[[nn.Module], dict[str, float]]
Augment = Callable[[Any, torch.Generator], Any]


@dataclass
class PurifyResult:
    model: nn.Module
    record: dict[str, Any] = field(default_factory=dict)


def _batches(inputs: Any, targets: torch.Tensor, batch_size: int):
    for idx in torch.arange(len(targets)).split(batch_size):
        yield index_inputs(inputs, idx), targets[idx]


@torch.no_grad()
def _mean_nll(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Likelihood, bs: int) -> float:
    total = sum(likelihood.nll(call_model(model, x), y).sum().double() for x, y in _batches(inputs, targets, bs))
    return float(total) / len(targets)


def diverged(start: float, end: float) -> bool:
    """Did tuning blow up the clean validation loss? More than doubled, and by more than 0.5 nats.

    Uses only the defender's clean data. A diverged run can show ASR 0 with a destroyed model, so it
    must not count as a purification (the report marks it and never calls it best).
    """
    return not math.isfinite(end) or (end > 2 * start and end - start > 0.5)


# A defense that leaves the model this much less accurate on the defender's own clean data has
# destroyed it (I-BAU at its paper options: clean ACC 94 % -> 13 %), whatever its ASR.
MAX_CLEAN_ACC_DROP = 0.2


def collapsed(acc_start: float, acc_end: float) -> bool:
    """Did the defense destroy clean accuracy? More than 20 points lost on the clean validation set."""
    return not math.isfinite(acc_end) or acc_end < acc_start - MAX_CLEAN_ACC_DROP


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: str = "cpu"):
    """Run with torch's global generators (CPU and ``device``'s) seeded with ``seed``, restored after.

    The tuning loop draws its own randomness from a seeded generator, but layers draw from the global
    one (dropout in PointNet++'s and ML-Decoder's heads), whose state at a stage's start differs from
    process to process: the same purification gave models 3 ASR points apart in two runs."""
    dev = torch.device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def guarded(run: Callable[..., PurifyResult]) -> Callable[..., PurifyResult]:
    """Wrap a method's ``run(model, x, y, likelihood, **kw)`` so that every result, tuning loop or
    baseline defense, records clean validation accuracy before and after and is flagged ``diverged``
    when its validation loss blew up or its clean accuracy collapsed (:func:`collapsed`). The method
    runs under :func:`seeded_global_rng` with its ``seed``, so a run repeats bit for bit."""
    def run_guarded(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Likelihood,
                    **kw: Any) -> PurifyResult:
        device = kw.get("device", "cpu")
        x, y = to_device(inputs, device), targets.to(device)
        acc_start = model_accuracy(model.to(device), x, y)
        with seeded_global_rng(int(kw.get("seed", 0)), device):
            result = run(model, inputs, targets, likelihood, **kw)
        acc_end = model_accuracy(result.model.to(device), x, y)
        result.model.cpu()
        rec = result.record
        rec["val_acc_start"], rec["val_acc_end"] = acc_start, acc_end
        if collapsed(acc_start, acc_end):
            rec["diverged"] = True
            rec["diverged_reason"] = "clean validation accuracy collapsed"
            warnings.warn(f"{rec.get('method')}: clean validation accuracy fell from {acc_start:.1%} to "
                          f"{acc_end:.1%}; the model is destroyed, not purified", RuntimeWarning, stacklevel=2)
        elif rec.get("diverged"):
            rec["diverged_reason"] = "clean validation loss blew up"
        else:
            rec["diverged"] = False
        return result
    return run_guarded


def _check_data(targets: torch.Tensor) -> None:
    if len(targets) == 0:
        raise SmoothPurifyError("the clean validation set is empty")
    if targets.dim() == 1 and targets.dtype in (torch.int64, torch.int32) and targets.unique().numel() < 2:
        raise SmoothPurifyError("the clean validation set has a single class; purification needs several")


def _make_optimizer(cfg: MethodConfig, params: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
    values = list(params.values())
    if cfg.optimizer == "sgd":
        return make_optimizer("sgd", values, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return make_optimizer("adam", values, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sam":
        return make_optimizer("sam", values, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              rho=cfg.sam_rho, adaptive=cfg.sam_adaptive)
    return make_optimizer("natural_gradient", values, lr=cfg.lr, damping=cfg.damping, momentum=cfg.momentum)


def _epochs(cfg: MethodConfig, n: int, batch_size: int, gen: torch.Generator):
    """Each epoch's batch indices: a shuffled pass over the data, or, with ``iterations``, batches
    drawn with replacement (ceil(n / batch_size) per epoch, the last epoch cut at ``iterations``)."""
    if cfg.iterations is None:
        for _ in range(cfg.epochs):
            yield torch.randperm(n, generator=gen).split(batch_size)
        return
    per_epoch, left = math.ceil(n / batch_size), cfg.iterations
    while left > 0:
        k = min(per_epoch, left)
        left -= k
        yield [torch.randint(n, (batch_size,), generator=gen) for _ in range(k)]


def _reinit_classifier(module: nn.Module, seed: int) -> None:
    """A fresh classifier (FT-init, FST): the layer's own initialisation under a fixed seed."""
    if not hasattr(module, "reset_parameters"):
        raise SmoothPurifyError(f"reinit_classifier: the classifier ({type(module).__name__}) cannot be "
                                "re-initialised (no reset_parameters)")
    with seeded_global_rng(seed):
        module.reset_parameters()


def _require_continuous(inputs: Any, what: str, done: str, option: str) -> None:
    """Mixing inputs (mixup views, overlays) needs one floating-point input tensor."""
    if not (isinstance(inputs, torch.Tensor) and inputs.is_floating_point()):
        raise SmoothPurifyError(f"{what}, which needs one floating-point input tensor (token or tuple inputs "
                                f"cannot be {done}); set {option} to 0")


def _freeze_batch_norm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _cuda_graphs(cfg: MethodConfig, objective: Objective, work: nn.Module, params: dict[str, torch.Tensor],
                 fused: list[bool] | None) -> dict[str, CapturedStep]:
    """The loop's whole-step CUDA graphs: a step without the trace term where the objective draws
    nothing at random on the host (no overlay, no mixup views) and some step has no trace term, and
    f-SFT's fused trace step."""
    graphs = {}
    if (cuda_graphs.CAPTURE_WHOLE_STEP and not cfg.overlay_max and not cfg.distill_mixup and not cfg.unlearn_share
            and not (cfg.trace_weight > 0 and cfg.trace_every == 1)):
        graphs["plain"] = CapturedStep(lambda bx, by: plain_step(objective, work, params, bx, by, on_device=True),
                                       module=work)
    if fused:
        graphs["trace"] = CapturedStep(lambda bx, by: fused_trace(objective, work, params, bx, by, on_device=True),
                                       module=work)
    return graphs


def purify(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Likelihood, config: MethodConfig,
           *, classifier: str | None = None, seed: int = 0, device: str = "cpu", evaluate: Evaluate | None = None,
           eval_every: int | None = None, progress: bool = True, augment: Augment | None = None,
           overlay: Overlay | None = None, unlearn_families: dict[str, BudgetedFamily] | None = None,
           precision: str = "auto", compile: bool = False) -> PurifyResult:
    """Purify a copy of ``model`` with ``config``; ``inputs, targets`` is the clean validation set.

    ``augment(x, generator)`` is the modality's training-time augmentation, applied to each batch
    when ``config.augment`` (not on cached features: they are the backbone's outputs).
    ``overlay`` is the modality's overlay for ``config.overlay_max`` (:data:`smoothpurify.objective.Overlay`;
    None: the blend; cached features are always blended).
    ``unlearn_families`` are the modality's trigger families for ``config.unlearn_share``
    (:mod:`smoothpurify.unlearn`): each family's suspect trigger is searched on the model as received.
    ``precision`` and ``compile`` choose the device's speed-ups (:mod:`smoothpurify.accel`; on a
    CPU ``"auto"`` is the reference path). The classifier alone (``last_layer``) and the natural
    gradient always run in float32: there is nothing to gain and the solve needs it.
    """
    cfg = config
    _check_data(targets)
    acc = resolve_accel(precision, device, compile=compile)
    if cfg.parametrization == "last_layer" or cfg.optimizer == "natural_gradient":
        acc = dataclasses.replace(acc, autocast=None, compile=False, graphs=False)
    batch_size = cfg.batch_size or len(targets)
    t0 = time.perf_counter()
    uses_head = cfg.reinit_classifier or cfg.feature_shift_weight > 0 or cfg.project_classifier_norm
    if uses_head and cfg.parametrization == "spectral":
        raise SmoothPurifyError(f"{cfg.name}: reinit_classifier / feature_shift_weight / project_classifier_norm "
                                "need the classifier's weight itself (parametrization full or last_layer)")
    tuned = prepare(model.to(device), cfg.parametrization, classifier=classifier, tune_bias=cfg.tune_bias,
                    tune_norm=cfg.tune_norm)
    acc.model(tuned.model)
    head = tuned.model.get_submodule(classifier_name(tuned.model, classifier)) if uses_head else None
    head_orig = head.weight.detach().clone() if head is not None else None
    inputs, targets = acc.inputs(to_device(inputs, device)), targets.to(device)
    work, work_inputs = tuned.model, inputs
    cached = cfg.parametrization == "last_layer" and cfg.cache_features
    if cached:
        # The backbone is frozen and in eval mode: its features never change, compute them once.
        tuned.eval()
        work = tuned.model.get_submodule(tuned.classifier)
        work_inputs = torch.cat([penultimate_features(tuned.model, x, tuned.classifier)
                                 for x, _ in _batches(inputs, targets, 512)])
    params = {n: p for n, p in work.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(seed)
    objective = Objective(likelihood, trace_weight=cfg.trace_weight, trace_every=cfg.trace_every,
                          trace_step_bound=cfg.trace_step_bound,
                          trace_fn=spectral_fisher_trace if cfg.parametrization == "spectral" and cfg.fast_trace
                          else fisher_trace, anchor_weight=cfg.anchor_weight, label_smoothing=cfg.label_smoothing)
    if cfg.feature_shift_weight > 0:
        objective.shift_weight = cfg.feature_shift_weight
        objective.shift_reference = {n: head_orig for n, p in params.items() if p is head.weight}
    if cfg.anchor_weight > 0:
        # Fisher and anchor at the backdoored model's own weights; a re-initialised classifier is
        # then left out of L_r (anchoring it would pull it back to the backdoored head).
        tuned.eval()
        objective.fisher_diag = fisher_diagonal(work, _batches(work_inputs, targets, 128), likelihood,
                                                mode=cfg.fisher, generator=gen, params=params)
        objective.anchor = {n: p.detach().clone() for n, p in params.items()}
        if cfg.reinit_classifier:
            for name in [n for n, p in params.items() if any(p is q for q in head.parameters())]:
                del objective.fisher_diag[name], objective.anchor[name]
    if cfg.distill_weight > 0:
        if not hasattr(likelihood, "distill"):
            raise SmoothPurifyError(f"{cfg.name}: distill_weight needs a likelihood with distill() "
                                    f"({type(likelihood).__name__} has none)")
        objective.distill_weight, objective.distill_temperature = cfg.distill_weight, cfg.distill_temperature
        objective.teacher = copy.deepcopy(work).eval().requires_grad_(False)
        if cfg.distill_mixup > 0:
            _require_continuous(work_inputs, f"{cfg.name}: distill_mixup mixes inputs", "mixed", "distill_mixup")
            objective.distill_mixup, objective.generator = cfg.distill_mixup, gen
    if cfg.overlay_max > 0:
        _require_continuous(work_inputs, f"{cfg.name}: overlay_max lays one input over another", "overlaid",
                            "overlay_max")
        objective.overlay_max, objective.generator = cfg.overlay_max, gen
        objective.overlay_fn = None if cached else overlay
    unlearnt = []
    if cfg.unlearn_share > 0:
        if cached or not isinstance(work_inputs, torch.Tensor):
            raise SmoothPurifyError(f"{cfg.name}: unlearn_share lays triggers on the inputs; it needs one input tensor "
                                    "and a tuned backbone (not the classifier alone)")
        with torch.no_grad():
            num_classes = call_model(work, work_inputs[:1]).shape[-1]
        families = chosen_families(unlearn_families or {}, cfg.unlearn_only, cfg.name)
        search = functools.partial(invert_triggers, work, work_inputs, targets, num_classes, families,
                                   InversionSettings(steps=cfg.unlearn_steps, restarts=cfg.unlearn_restarts,
                                                     grid=cfg.unlearn_grid),
                                   generator=gen, progress=progress)
        unlearnt = search()
        objective.trigger_views = TriggerViews(unlearnt, families, cfg.unlearn_share, gen)  # views see later finds too
    if cfg.reinit_classifier:
        _reinit_classifier(head, seed)
    tuned.eval()
    val_loss_start = _mean_nll(work, work_inputs, targets, likelihood, 512)
    setup_seconds = time.perf_counter() - t0

    opt = _make_optimizer(cfg, params)
    base_opt = getattr(opt, "base_optimizer", opt)
    sched = (torch.optim.lr_scheduler.StepLR(base_opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
             if cfg.lr_step else None)
    head_norm = float(head_orig.norm()) if cfg.project_classifier_norm else None
    fused = [True] if fuses_trace(cfg, objective) else None
    guard = FiniteGuard(acc.defer_checks, cfg.name, f"lower the learning rate (now {cfg.lr})")
    runner = acc.callable(work)
    graphs = _cuda_graphs(cfg, objective, work, params, fused) if acc.graphs else None
    if acc.graphs and graphs.get("plain") is None and not cfg.distill_mixup:
        runner = GraphedRunner(work)  # not with mixup views: the runner would run twice per backward
    n, step, eval_seconds = num_samples(work_inputs), 0, 0.0
    val_loss, curves, parts, part_sums = [], [], {}, []
    steps_total = cfg.iterations or cfg.epochs * math.ceil(n / batch_size)
    epochs_total = math.ceil(steps_total / math.ceil(n / batch_size))
    do_augment = cfg.augment and augment is not None and not cached
    searches = search_epochs(epochs_total, cfg.unlearn_rounds)[1:] if unlearnt else []
    bar = tqdm(total=steps_total, desc=f"purify {cfg.name}", disable=None if progress else True, leave=False)
    t1 = time.perf_counter()
    for epoch, order in enumerate(_epochs(cfg, n, batch_size, gen), start=1):
        if epoch in searches:  # before train(): the search leaves the model in the mode it found
            unlearnt += search(epoch=epoch)
        part_sums.append({})
        tuned.train()
        if cfg.bn_mode == "eval":
            _freeze_batch_norm(tuned.model)
        sizes = [len(idx) for idx in order]  # one transfer of the epoch's indices, not one per step
        for idx in torch.cat(order).to(targets.device).split(sizes):
            x, y = index_inputs(work_inputs, idx), targets[idx]
            if do_augment:
                x = acc.inputs(augment(x, gen))
            closure = BatchClosure(opt, objective, work, params, x, y, step, cfg, f"epoch {epoch}, step {step}",
                                   guard, fused, runner, graphs)
            with acc.step_context():
                opt.step(closure)
            parts = closure.parts if acc.defer_checks else floats(closure.parts)
            if head_norm is not None:
                with torch.no_grad():  # FST's constraint ||W_c|| = ||W_c^orig||, by projection
                    head.weight.mul_(head_norm / head.weight.norm().clamp_min(1e-12))
            step += 1
            for key, value in parts.items():
                part_sums[-1].setdefault(key, []).append(value)
            bar.update(1)
            if not acc.defer_checks:
                bar.set_postfix(epoch=epoch, **{k: f"{v:.3g}" for k, v in parts.items()})
        guard.flush()
        part_sums[-1] = {k: mean_of(v) for k, v in part_sums[-1].items()}  # one look at the device per epoch
        if acc.defer_checks:
            bar.set_postfix(epoch=epoch, **{k: f"{v:.3g}" for k, v in part_sums[-1].items()})
        if sched is not None:
            sched.step()
        tuned.eval()
        val_loss.append(_mean_nll(work, work_inputs, targets, likelihood, 512))
        if evaluate is not None and eval_every and (epoch % eval_every == 0 or epoch == epochs_total):
            te = time.perf_counter()
            curves.append({"epoch": epoch, "val_loss": val_loss[-1], **evaluate(tuned.model)})
            eval_seconds += time.perf_counter() - te
    bar.close()
    tuning_seconds = time.perf_counter() - t1 - eval_seconds
    graph_captures = ((runner.captures if isinstance(runner, GraphedRunner) else 0)  # shapes captured
                      + sum(g.captures for g in (graphs or {}).values() if g is not None))
    tuned.eval()
    merged = tuned.merge().eval()
    if acc.channels_last:  # the caller gets the default memory order (safetensors stores contiguous tensors)
        merged.to(memory_format=torch.contiguous_format)
    record: dict[str, Any] = {
        "method": cfg.name, "recommended": cfg.name == "recommended", "config": cfg.model_dump(), "seed": seed,
        "steps": step,
        "tuned_parameters": int(sum(p.numel() for p in params.values())),
        "seconds": {"setup": round(setup_seconds, 3), "tuning": round(tuning_seconds, 3),
                    "total": round(setup_seconds + tuning_seconds, 3)},
        "val_loss_start": val_loss_start, "val_loss": val_loss, "last_step": floats(parts),
        # each objective term's mean over the steps of each epoch that computed it
        "terms_per_epoch": part_sums,
        "accel": {"precision": precision, "autocast": str(acc.autocast).removeprefix("torch.") if acc.autocast else None,
                  "channels_last": acc.channels_last, "compile": acc.compile, "cuda_graphs": graph_captures,
                  "cudnn_benchmark": acc.cudnn_benchmark},
        "diverged": diverged(val_loss_start, val_loss[-1]),
    }
    if unlearnt:
        record["unlearned_triggers"] = [t.to_record(families[t.family]) for t in unlearnt]
    if record["diverged"]:
        warnings.warn(f"{cfg.name}: the clean validation loss rose from {val_loss_start:.3g} to {val_loss[-1]:.3g}; "
                      f"the tuning diverged (lower lr, now {cfg.lr}, or trace_weight, now {cfg.trace_weight})",
                      RuntimeWarning, stacklevel=2)
    if curves:
        record["curves"] = curves
    if evaluate is not None:
        record["metrics"] = evaluate(merged)
    return PurifyResult(merged, record)
