"""Purify a checkpoint trained outside the pipeline: the practitioner's path (``smoothpurify purify``).

The user brings a safetensors checkpoint, an architecture (a registry name of a modality, or
``path/to/file.py:factory`` returning their own ``nn.Module``) and a little clean data. Every
mistake a user can make here ends in one :class:`SmoothPurifyError` line.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import load_into, load_state, save_bundle
from smoothpurify.metrics import accuracy, correct, model_accuracy
from smoothpurify.model import classifier_name
from modalities.contract import Modality, unlearn_families
from smoothpurify.training import predict, predict_logits, to_device


def load_factory(spec: str, num_classes: int) -> nn.Module:
    """``path/to/file.py:factory`` -> the module the factory returns (``num_classes`` passed if accepted)."""
    path_str, _, name = spec.rpartition(":")
    path = Path(path_str)
    if not path.is_file():
        raise SmoothPurifyError(f"model file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"user_model_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's file: report its failure in one line
        raise SmoothPurifyError(f"importing {path} failed: {type(err).__name__}: {err}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SmoothPurifyError(f"{path} has no callable {name!r}")
    try:
        accepts = "num_classes" in inspect.signature(factory).parameters
        model = factory(num_classes=num_classes) if accepts else factory()
    except Exception as err:  # the user's code: report its failure in one line
        raise SmoothPurifyError(f"{spec} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(model, nn.Module):
        raise SmoothPurifyError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(mod: Modality, spec: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    if spec.endswith(".py"):
        raise SmoothPurifyError(f"--model {spec}: name the factory function, e.g. {spec}:build_model")
    if ".py:" in spec:
        return load_factory(spec, num_classes)
    return mod.create_model(spec, num_classes=num_classes, **mod.model_kwargs(input_shape))


def check_out(out: Path, checkpoint: Path) -> None:
    """Refuse, before any work, an output that cannot be written or would destroy something."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise SmoothPurifyError(f"--out {out}: name the purified checkpoint *.safetensors (its metadata goes next to "
                                "it as .json and its record as .record.json)")
    if out.is_dir():
        raise SmoothPurifyError(f"--out {out} is a folder; name a file, e.g. {out / 'purified.safetensors'}")
    if out.exists() and out.resolve() == Path(checkpoint).resolve():
        raise SmoothPurifyError(f"--out {out} is the checkpoint being purified; choose another file")
    parent = out.parent if str(out.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SmoothPurifyError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SmoothPurifyError(f"--out {out}: cannot write in {parent.resolve()}")


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` that this torch can use, else one error line."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SmoothPurifyError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise SmoothPurifyError(f"--device {device!r}: only cpu and cuda are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SmoothPurifyError(f"--device {device}: this torch build has no usable CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SmoothPurifyError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _check_inputs(x: Any, what: str, shape: tuple[int, ...] | None = None) -> None:
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise SmoothPurifyError(f"{what} has inputs of shape {tuple(x.shape[1:])}, the clean data {tuple(shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise SmoothPurifyError(f"{what} holds NaN or infinite values (check --normalize)")


def multi_hot(y: torch.Tensor, num_classes: int) -> bool:
    """Multi-label targets: float ``[N, num_classes]`` of 0 / 1 (a modality with ``Bernoulli`` outputs)."""
    return y.is_floating_point() and y.dim() == 2 and y.shape[1] == num_classes and bool(((y == 0) | (y == 1)).all())


def _check_labels(y: torch.Tensor, num_classes: int, what: str) -> None:
    if len(y) == 0:
        raise SmoothPurifyError(f"{what} is empty")
    if multi_hot(y, num_classes):
        return
    if y.is_floating_point():
        raise SmoothPurifyError(f"{what} has non-integer labels ({y.dtype})")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise SmoothPurifyError(f"{what} has labels {int(y.min())}..{int(y.max())} but --num-classes is {num_classes}")


def _check_forward(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    try:
        with torch.no_grad():
            out = model.eval()(x[:2])
    except RuntimeError as err:
        raise SmoothPurifyError(f"the model cannot process inputs of shape {tuple(x.shape[1:])}: "
                                f"{str(err).splitlines()[0]}") from None
    if out.shape[-1] != num_classes:
        raise SmoothPurifyError(f"the model outputs {out.shape[-1]} classes, --num-classes is {num_classes}")


def backdoor_report(model: nn.Module, test: tuple | None, poisoned: tuple | None, target_label: int | None,
                    device: str) -> dict[str, float]:
    """ACC on clean test data; ASR / RA on poisoned data (true labels + target, or per-sample targets)."""
    out: dict[str, float] = {}
    if any(d is not None and d[1].is_floating_point() and d[1].dim() == 2 for d in (test, poisoned)):
        # Multi-label: ACC is per-label accuracy (logit > 0), ASR the share of poisoned inputs whose
        # every label is the attacker's (their labels are the per-sample targets).
        if test is not None:
            out["acc"] = float(correct(predict_logits(model, test[0], device=device), test[1]).mean())
        if poisoned is not None:
            out["asr"] = float((correct(predict_logits(model, poisoned[0], device=device), poisoned[1]) == 1).float().mean())
        return out
    if test is not None:
        out["acc"] = accuracy(predict(model, test[0], device=device), test[1])
    if poisoned is not None:
        x, y = poisoned
        if target_label is not None:
            keep = y != target_label  # inputs of the target class say nothing about the backdoor
            pred = predict(model, x[keep], device=device)
            out["asr"] = accuracy(pred, torch.full_like(y[keep], target_label))
            out["ra"] = accuracy(pred, y[keep])
        else:
            out["asr"] = accuracy(predict(model, x, device=device), y)
    return out


def load_user_model(mod: Modality, checkpoint: Path, model_spec: str, num_classes: int, clean: tuple) -> nn.Module:
    """The user's checkpoint in the named architecture, after checking the clean data against it."""
    x, y = clean
    _check_inputs(x, "the clean data")
    _check_labels(y, num_classes, "the clean data")
    model = load_into(build_model(mod, model_spec, num_classes, tuple(x.shape[1:])), load_state(checkpoint),
                      source=str(checkpoint))
    _check_forward(model, x, num_classes)
    return model


def purify_checkpoint(mod: Modality, *, checkpoint: Path, model_spec: str, num_classes: int, clean: tuple,
                      method_runner, out: Path, classifier: str | None = None, test: tuple | None = None,
                      poisoned: tuple | None = None, target_label: int | None = None, seed: int = 0,
                      device: str = "cpu", progress: bool = True, keep_diverged: bool = False,
                      warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Check everything, load, purify and save; returns the record (also written next to ``out``).

    A run that diverged or destroyed clean accuracy is not a purification: nothing is written and
    one error line says so, unless ``keep_diverged``. ``warn(message)`` hears of a model that is at
    chance level on the clean data before purification (default: ``warnings.warn``).
    """
    x, y = clean
    check_out(out, checkpoint)
    check_device(device)
    _check_inputs(x, "the clean data")
    _check_labels(y, num_classes, "the clean data")
    if not multi_hot(y, num_classes) and y.unique().numel() < 2:
        raise SmoothPurifyError("the clean data holds a single class; purification needs several")
    if target_label is not None and not 0 <= target_label < num_classes:
        raise SmoothPurifyError(f"--target-label {target_label} is outside 0..{num_classes - 1}")
    for name, data in (("the clean test data", test), ("the poisoned test data", poisoned)):
        if data is not None:
            _check_inputs(data[0], name, tuple(x.shape[1:]))
            _check_labels(data[1], num_classes, name)
    state = load_state(checkpoint)
    model = load_into(build_model(mod, model_spec, num_classes, tuple(x.shape[1:])), state, source=str(checkpoint))
    head = classifier_name(model, classifier)
    _check_forward(model, x, num_classes)
    model.to(device)
    before = backdoor_report(model, test, poisoned, target_label, device)
    clean_acc = model_accuracy(model, to_device(x, device), y.to(device))
    if clean_acc < 1.5 / num_classes:
        (warn or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=2)))(
            f"the model is at chance level on the clean data before purification (accuracy {clean_acc:.1%} for "
            f"{num_classes} classes): check --normalize, the data layout and --num-classes")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a divergence is reported below, in plain words
        result = method_runner(model, x, y, mod.likelihood, classifier=head, seed=seed, device=device,
                               progress=progress, augment=mod.augment,
                               overlay=getattr(mod, "overlay", None),
                               unlearn_families=unlearn_families(mod))
    rec = result.record
    if rec.get("diverged") and not keep_diverged:
        raise SmoothPurifyError(
            f"{rec.get('method', 'the method')} did not purify this model: {rec.get('diverged_reason', 'it diverged')} "
            f"(clean validation accuracy {rec.get('val_acc_start', float('nan')):.1%} -> "
            f"{rec.get('val_acc_end', float('nan')):.1%}); nothing was written (--keep-diverged writes it anyway)")
    after = backdoor_report(result.model, test, poisoned, target_label, device)
    record = {"checkpoint": str(checkpoint), "model": model_spec, "classifier": head, "num_classes": num_classes,
              "clean_samples": int(len(y)), "before": before, "after": after,
              "wall_seconds": round(time.perf_counter() - t0, 2),
              **{k: v for k, v in result.record.items() if k != "metrics"}}
    save_bundle(out, result.model.cpu(), {"architecture": model_spec, "num_classes": num_classes, "classifier": head,
                                          "purified_by": record.get("method", ""), "source_checkpoint": str(checkpoint)},
                record)
    return record
