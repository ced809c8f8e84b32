"""The scan measured against a clean reference: which classes are easy *because of the data*.

Neural Cleanse's anomaly index (:mod:`smoothpurify.scan`) assumes that in a clean model every class is
about as hard to reach. Real classes are not exchangeable: some are natural hubs (on Fashion-MNIST the
bag, the shirt), easy to reach in every benign model, so a clean model is flagged at its hub. A model
of the same architecture, re-initialised and trained on the defender's clean data alone, cannot hold
the attacker's backdoor but shares the data's hubs. Scanning it with the same searches (same seed)
measures each class's natural ease; the scan then asks whether a class is anomalously easy *relative
to that*: per family, the anomaly index of ``log size_t(model) - log size_t(reference)`` over classes.

The families are combined per class by Stouffer's sum, ``Z_t = sum_f A_{t,f} / sqrt(F)``: a backdoor
makes its target easy for several searches at once, while the searches' noise is independent. The
flag threshold is the ``1 - fpr`` quantile of ``max_t Z_t`` under the null hypothesis of independent
normal log sizes (the differences of two such are normal again), computed once by Monte Carlo
(:func:`null_threshold`), so "flags at most ``fpr`` of clean models" is a stated property of the rule
and no threshold is read off the models it judges.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.scan import CombinedScan, ScanResult, log_sizes, mad_anomaly, mad_scores
from smoothpurify.training import train

NULL_FPR = 0.05          # the share of clean models a referenced scan may flag


def reinitialised(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every parameter drawn afresh (each module's ``reset_parameters``);
    a parameter no module resets would carry the received weights into the reference: refused."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    reset: set[int] = set()
    for module in fresh.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
            reset.update(id(p) for p in module.parameters(recurse=False))
    missed = [name for name, p in fresh.named_parameters() if id(p) not in reset]
    if missed:
        raise SmoothPurifyError(f"scan reference: no module resets {', '.join(missed[:3])}"
                                f"{' ...' if len(missed) > 3 else ''}; the reference would keep the received "
                                "weights there (give those modules a reset_parameters method)")
    return fresh


@dataclass
class ReferenceTraining:
    epochs: int = 40
    lr: float = 0.05
    batch_size: int = 64
    seed: int = 0


def train_reference(model: nn.Module, inputs: Any, targets: torch.Tensor, likelihood: Any, *,
                    augment: Callable | None = None, settings: ReferenceTraining | None = None,
                    device: str = "cpu", progress: bool = True) -> nn.Module:
    """The clean reference: ``model``'s architecture, re-initialised, trained on the clean data with
    the modality's augmentation (SGD, cosine schedule: :func:`smoothpurify.training.train`)."""
    settings = settings or ReferenceTraining()
    reference = reinitialised(model, settings.seed)
    train(reference, inputs, targets, likelihood, epochs=settings.epochs, lr=settings.lr,
          batch_size=settings.batch_size, seed=settings.seed, augment=augment, device=device,
          desc="scan: reference", progress=progress)
    return reference.eval()


@functools.lru_cache(maxsize=32)
def null_threshold(num_classes: int, families: int, fpr: float = NULL_FPR, draws: int = 100000) -> float:
    """The ``1 - fpr`` quantile of ``max_t Z_t`` when every family's log sizes are independent standard
    normal draws (the anomaly index is scale-free, so the scale does not matter); fixed seed."""
    if num_classes < 3:
        raise SmoothPurifyError("the scan needs at least 3 classes (a median and a spread of the others)")
    gen = torch.Generator().manual_seed(0)
    logs = torch.randn(draws, families, num_classes, generator=gen, dtype=torch.float64)
    z = mad_scores(logs).sum(1) / math.sqrt(families)
    return float(z.max(-1).values.quantile(1 - fpr))


@dataclass
class ReferencedScan:
    """A scan judged against a clean reference's scan (module docstring); duck-compatible with
    :class:`smoothpurify.scan.CombinedScan` (``flagged``, ``suspected``, ``anomaly_of``, ``risk`` ...).
    ``results`` are the model's per-family results with their anomaly relative to the reference."""
    scanned: CombinedScan
    reference: CombinedScan
    fpr: float = NULL_FPR
    # what the reference is, in the risk's words: a clean reference, or the same model after purification
    # (then a flag says which class the purification made much harder to reach: the removed backdoor's)
    reference_label: str = "a model trained on the clean data alone"

    def __post_init__(self) -> None:
        if set(self.scanned.results) != set(self.reference.results):
            raise SmoothPurifyError("scan reference: the model and its reference were scanned with other families")
        names = list(self.scanned.results)
        k = len(self.scanned.results[names[0]].anomaly)
        self.threshold = null_threshold(k, len(names), self.fpr)
        single = null_threshold(k, 1, self.fpr)
        self.results: dict[str, ScanResult] = {}
        for name in names:
            own, ref = self.scanned.results[name], self.reference.results[name]
            rel = [a - b for a, b in zip(log_sizes([t.size for t in own.triggers]),
                                         log_sizes([t.size for t in ref.triggers]))]
            anomaly = mad_anomaly(rel)
            top = max(range(k), key=anomaly.__getitem__)
            self.results[name] = type(own)(own.triggers, anomaly, top if anomaly[top] > single else None, single,
                                           own.seconds)
        self.combined = [sum(r.anomaly[t] for r in self.results.values()) / math.sqrt(len(names)) for t in range(k)]

    @property
    def top(self) -> int:
        """The class with the largest combined sum, flagged or not."""
        return max(range(len(self.combined)), key=self.combined.__getitem__)

    @property
    def max_anomaly(self) -> float:
        return self.combined[self.top]

    @property
    def suspected(self) -> int | None:
        return self.top if self.max_anomaly > self.threshold else None

    @property
    def flagged(self) -> bool:
        return self.suspected is not None

    @property
    def seconds(self) -> float:
        return self.scanned.seconds + self.reference.seconds

    def anomaly_of(self, cls: int) -> float:
        return self.combined[cls]

    def risk(self) -> str:
        top = self.top
        z, per = self.combined[top], ", ".join(f"{n} {r.anomaly[top]:.1f}" for n, r in self.results.items())
        if self.flagged:
            return (f"high: class {top} is easier to reach than in {self.reference_label}, by "
                    f"{z:.1f} combined MADs ({per}; flag at {self.threshold:.2f}, which flags {self.fpr:.0%} of "
                    f"clean models); a backdoor to class {top} is likely")
        level = "low to moderate" if z > self.threshold / 2 else "low"
        return (f"{level}: against {self.reference_label} the most anomalous class ({top}) is at {z:.1f} combined "
                f"MADs ({per}), under the flag at {self.threshold:.2f}")

    def to_record(self) -> dict[str, Any]:
        families = {}
        for name, r in self.results.items():
            families[name] = {**r.to_record(), "reference_sizes": [t.size for t in self.reference.results[name].triggers],
                              "raw_anomaly": self.scanned.results[name].anomaly}
        return {"families": families, "combined": self.combined, "max_anomaly": self.max_anomaly,
                "suspected": self.suspected, "flagged": self.flagged, "threshold": self.threshold, "fpr": self.fpr,
                "reference": self.reference_label, "risk": self.risk(), "seconds": round(self.seconds, 3),
                "reference_seconds": round(self.reference.seconds, 3)}
