"""A backdoor scan from the model and clean data alone: Neural Cleanse (Wang et al., "Neural Cleanse:
Identifying and Mitigating Backdoor Attacks in Neural Networks", S&P 2019, Sec. IV).

A backdoor to class ``t`` is a shortcut: a small change to any input sends it to ``t``. For every
class ``t`` the scan looks for the smallest trigger that sends clean inputs of the *other* classes to
``t``,

    min_theta  CE(f(apply(x, theta)), t) + lambda * size(theta),

and compares the sizes across classes. The backdoor's target needs a much smaller trigger than any
natural class: its size is an outlier below the median. Outliers are measured with the median
absolute deviation (MAD), robust to the outlier itself: ``A_t = (median - l_t) / (1.4826 MAD)`` over
``l_t = log size_t`` (1.4826 makes the MAD of a normal sample its standard deviation); the paper
flags ``A_t > 2``. Unlike the paper we take logs: a size is a scale, and on a clean WRN-16-1 the
classes' sizes already span a factor of 7 (36 to 247 pixels of mask), so on raw sizes one large
class inflates the MAD and hides a 10x smaller target (README, "Backdoor scan").

``lambda`` is adapted as in the paper: it starts at ``init_cost``; after each pass, while the trigger
sends at least ``success`` of the inputs to ``t`` it is multiplied by ``cost_up`` (shrink the trigger),
otherwise divided by ``cost_down`` (grow it); the smallest trigger that reached ``success`` is kept.

What a trigger is depends on the input: :class:`MaskPattern` is the paper's (``(1 - m) x + m p`` with
one mask over the last two axes, shared by channels and frames: images, video); :class:`Additive` is a
universal additive perturbation with its L2 norm as the size (point clouds, embeddings, and on images
the whole-image triggers a small mask cannot express: a blended pattern, a sinusoid). Nothing here
knows a modality; the pipeline picks the families. :func:`scan_families` runs several and flags a
class when any family does (:class:`CombinedScan`); a family may bring its own search instead of a
trigger (``family.scan(...)``: the maximum-margin statistic of :mod:`smoothpurify.max_margin`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from smoothpurify import SmoothPurifyError
from smoothpurify.model import call_model
from smoothpurify.training import index_inputs

MAD_CONSISTENCY = 1.4826   # MAD -> standard deviation for normal data
FLAG_THRESHOLD = 2.0       # the paper's anomaly-index threshold


class TriggerFamily(Protocol):
    def init(self, example: torch.Tensor) -> dict[str, torch.Tensor]:
        """Free parameters of a trigger (unconstrained reals), shaped for one input ``example``."""

    def apply(self, x: torch.Tensor, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch ``x`` with the trigger on it."""

    def size(self, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        """The trigger's size (differentiable scalar) that the scan minimises and compares."""

    def picture(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What to save and show of the trigger, in input units."""


class MaskPattern:
    """Neural Cleanse's trigger: ``(1 - m) x + m p``, ``m = sigmoid(a)`` of shape ``[H, W]`` (L1 size),
    ``p = sigmoid(b)`` of shape ``[C, H, W]`` in the input range [0, 1]."""

    def init(self, example: torch.Tensor) -> dict[str, torch.Tensor]:
        if example.dim() < 3:
            raise SmoothPurifyError("a mask-and-pattern trigger needs inputs shaped [..., C, H, W]")
        c, h, w = example.shape[-3:]
        return {"mask": torch.full((h, w), -2.0), "pattern": torch.zeros(c, h, w)}

    def apply(self, x: torch.Tensor, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        m, p = torch.sigmoid(theta["mask"]), torch.sigmoid(theta["pattern"])
        return (1 - m) * x + m * p

    def size(self, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(theta["mask"]).sum()

    def picture(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m, p = torch.sigmoid(theta["mask"]).detach(), torch.sigmoid(theta["pattern"]).detach()
        return {"mask": m, "pattern": p, "trigger": m * p}


class Additive:
    """A universal additive perturbation ``x + d`` (one input-shaped ``d``); size ``||d||_2``."""

    def init(self, example: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"delta": torch.zeros_like(example)}

    def apply(self, x: torch.Tensor, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return x + theta["delta"]

    def size(self, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return theta["delta"].pow(2).sum().add(1e-12).sqrt()

    def picture(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        delta = theta["delta"].detach()
        # shown as 0.5 + delta / (2 max|delta|): grey is no change
        return {"delta": delta, "trigger": 0.5 + delta / (2 * delta.abs().max().clamp_min(1e-12))}


@dataclass
class ScanSettings:
    steps: int = 120            # optimisation steps per class
    batch_size: int = 64
    lr: float = 0.1             # Adam on the trigger's free parameters
    init_cost: float = 1e-3     # lambda at the start (paper: 1e-3)
    cost_up: float = 1.5        # paper: 1.5 up, 1.5 ** 1.5 down
    cost_down: float = 1.5 ** 1.5
    success: float = 0.95       # share of inputs sent to t for a trigger to count (paper: 0.99)
    adapt_every: int = 10       # steps between lambda updates
    threshold: float = FLAG_THRESHOLD
    margin_steps: int = 600     # Adam steps per class of the maximum-margin statistic (smoothpurify.max_margin)
    per_sample_steps: int = 100  # DDN steps per class of the per-sample family (smoothpurify.per_sample)


@dataclass
class ClassTrigger:
    target: int
    size: float                 # the smallest size that reached `success` (inf: never reached)
    success: float              # share of held inputs sent to the target by that trigger
    picture: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ScanResult:
    triggers: list[ClassTrigger]
    anomaly: list[float]        # A_t per class (positive: smaller than the median)
    suspected: int | None       # the most anomalous class when flagged
    threshold: float
    seconds: float = 0.0

    @classmethod
    def judged(cls, triggers: list[ClassTrigger], threshold: float, seconds: float) -> ScanResult:
        """The result of ``triggers``: their anomaly indices, and the most anomalous class if over ``threshold``."""
        anomaly = anomaly_index([t.size for t in triggers])
        top = max(range(len(triggers)), key=anomaly.__getitem__)
        return cls(triggers, anomaly, top if anomaly[top] > threshold else None, threshold, seconds)

    def value_label(self, cls: int) -> str:
        """Class ``cls``'s scanned value in words (a figure's caption)."""
        return f"size {self.triggers[cls].size:.3g}"

    @property
    def flagged(self) -> bool:
        return self.suspected is not None

    @property
    def max_anomaly(self) -> float:
        return max(self.anomaly)

    def risk(self) -> str:
        """The result in plain words."""
        top = max(range(len(self.anomaly)), key=self.anomaly.__getitem__)
        a = self.anomaly[top]
        if self.flagged:
            return (f"high: class {top}'s trigger is {a:.1f} MADs smaller than the median class's "
                    f"(flag at {self.threshold:.2f}); a backdoor to class {top} is likely")
        if a > self.threshold / 2:
            return f"low to moderate: the most anomalous class ({top}) is at {a:.1f} MADs, under the flag at {self.threshold:.2f}"
        return f"low: no class needs a much smaller trigger than the others (largest anomaly {a:.1f})"

    def to_record(self) -> dict[str, Any]:
        return {"sizes": [t.size for t in self.triggers], "success": [t.success for t in self.triggers],
                "anomaly": self.anomaly, "max_anomaly": self.max_anomaly, "suspected": self.suspected,
                "flagged": self.flagged, "threshold": self.threshold, "risk": self.risk(),
                "seconds": round(self.seconds, 3)}


def log_sizes(sizes: list[float]) -> list[float]:
    """``log size_t``; an unreached class (inf) counts as twice the largest reached size."""
    finite = [s for s in sizes if math.isfinite(s)]
    cap = 2 * max(finite) if finite else 1.0
    return [math.log(max(s if math.isfinite(s) else cap, 1e-6)) for s in sizes]


def mad_scores(values: torch.Tensor) -> torch.Tensor:
    """``(median - v_t) / (1.4826 MAD)`` along the last dimension (the median of an even count: the
    mean of the two middle values; torch's median takes the lower); 0 where the MAD is 0."""
    med = values.quantile(0.5, dim=-1, keepdim=True)
    mad = (values - med).abs().quantile(0.5, dim=-1, keepdim=True) * MAD_CONSISTENCY
    return torch.where(mad > 0, (med - values) / mad.where(mad > 0, torch.ones_like(mad)), torch.zeros_like(values))


def mad_anomaly(values: list[float]) -> list[float]:
    """:func:`mad_scores` of one list of per-class values."""
    return [float(a) for a in mad_scores(torch.tensor(values, dtype=torch.float64))]


def anomaly_index(sizes: list[float]) -> list[float]:
    """:func:`mad_anomaly` of :func:`log_sizes`; all zero when no class was reached."""
    if not any(math.isfinite(s) for s in sizes):
        return [0.0] * len(sizes)
    return mad_anomaly(log_sizes(sizes))


def reverse_engineer(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, target: int,
                     family: TriggerFamily, settings: ScanSettings, generator: torch.Generator) -> ClassTrigger:
    """The smallest trigger of ``family`` that sends the inputs not of class ``target`` to it."""
    others = torch.nonzero(targets != target).flatten()
    if len(others) == 0:
        raise SmoothPurifyError(f"scan: no clean inputs outside class {target}")
    device = inputs.device
    theta = {k: v.to(device).requires_grad_(True) for k, v in family.init(inputs[0]).items()}
    opt = torch.optim.Adam(list(theta.values()), lr=settings.lr, betas=(0.5, 0.9))
    cost, best_size, best_success, best = settings.init_cost, math.inf, 0.0, None
    hits, seen = 0, 0
    goal = torch.full((settings.batch_size,), target, device=device)
    for step in range(1, settings.steps + 1):
        idx = others[torch.randint(len(others), (settings.batch_size,), generator=generator).to(others.device)]
        x = family.apply(index_inputs(inputs, idx), theta)
        out = call_model(model, x)
        ce = nn.functional.cross_entropy(out, goal)
        size = family.size(theta)
        opt.zero_grad(set_to_none=True)
        (ce + cost * size).backward()
        opt.step()
        hits += int((out.argmax(-1) == goal).sum())
        seen += settings.batch_size
        if step % settings.adapt_every == 0:
            rate = hits / seen
            if rate >= settings.success:
                if float(size.detach()) < best_size:
                    best_size, best_success = float(size.detach()), rate
                    best = family.picture({k: v.detach().cpu() for k, v in theta.items()})
                cost *= settings.cost_up
            else:
                cost /= settings.cost_down
            hits, seen = 0, 0
    if best is None:  # never reached `success`: show where the search ended
        best = family.picture({k: v.detach().cpu() for k, v in theta.items()})
    return ClassTrigger(target, best_size, best_success, best)


def scan(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, num_classes: int, family: TriggerFamily,
         settings: ScanSettings | None = None, *, seed: int = 0, device: str = "cpu",
         progress: bool = True) -> ScanResult:
    """Reverse-engineer a trigger for every class and flag an anomalously small one."""
    settings = settings or ScanSettings()
    t0 = time.perf_counter()
    model = model.to(device).eval()
    inputs, targets = inputs.to(device), targets.to(device)
    gen = torch.Generator().manual_seed(seed)
    with frozen(model):
        triggers = [reverse_engineer(model, inputs, targets, t, family, settings, gen)
                    for t in tqdm(range(num_classes), desc="scan: classes", disable=None if progress else True,
                                  leave=False)]
    return ScanResult.judged(triggers, settings.threshold, time.perf_counter() - t0)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The model's parameters without gradients while a search optimises inputs; each as it was after."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


@dataclass
class CombinedScan:
    """Scans with several trigger families: flagged when any family flags a class; the suspect is the
    flagged family's most anomalous class (the largest anomaly over the flagged families)."""
    results: dict[str, ScanResult]

    def _top(self) -> tuple[str, ScanResult]:
        flagged = {k: r for k, r in self.results.items() if r.flagged} or self.results
        return max(flagged.items(), key=lambda kv: kv[1].max_anomaly)

    @property
    def flagged(self) -> bool:
        return any(r.flagged for r in self.results.values())

    @property
    def suspected(self) -> int | None:
        return self._top()[1].suspected

    @property
    def max_anomaly(self) -> float:
        return max(r.max_anomaly for r in self.results.values())

    @property
    def threshold(self) -> float:
        return self._top()[1].threshold

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results.values())

    def anomaly_of(self, cls: int) -> float:
        """Class ``cls``'s largest anomaly index over the families."""
        return max(r.anomaly[cls] for r in self.results.values())

    def risk(self) -> str:
        family, result = self._top()
        return f"{result.risk()} ({family} triggers)" if len(self.results) > 1 else result.risk()

    def to_record(self) -> dict[str, Any]:
        return {"families": {k: r.to_record() for k, r in self.results.items()}, "max_anomaly": self.max_anomaly,
                "suspected": self.suspected, "flagged": self.flagged, "family": self._top()[0],
                "threshold": self.threshold, "risk": self.risk(), "seconds": round(self.seconds, 3)}


def residual(before: Any, after: Any) -> dict[str, Any]:
    """What the scan of a purified model (``after``) says about the backdoor the scan of the model as
    received (``before``) found. A backdoor's target is fixed by its training, so where ``before``
    flagged class ``t`` the question is whether ``t`` is still anomalous (``cleared``: its anomaly is at
    or under the flag threshold); another class flagged only afterwards is reported as ``new_flag``,
    a side effect of the purification (a fresh classifier leaves some class easier to reach), not the
    received backdoor. Where ``before`` flagged nothing there is no class to follow: ``cleared`` is
    then "the purified model is not flagged either"."""
    if not before.flagged:
        return {"tracked": None, "anomaly": after.max_anomaly, "cleared": not after.flagged, "new_flag":
                after.suspected if after.flagged else None}
    target = before.suspected
    anomaly = after.anomaly_of(target)
    return {"tracked": target, "anomaly": anomaly, "cleared": anomaly <= after.threshold,
            "new_flag": after.suspected if after.flagged and after.suspected != target else None}


def residual_line(res: dict[str, Any], threshold: float) -> str:
    """:func:`residual` in words."""
    new = (f"; class {res['new_flag']} is flagged now, which the received model was not: a side effect of the "
           "purification, not the received backdoor" if res["new_flag"] is not None else "")
    if res["tracked"] is None:
        return ("the received model was not flagged, so there is no class to follow; the purified model is "
                + ("not flagged" if res["cleared"] else f"flagged (largest anomaly {res['anomaly']:.2f})") + new)
    state = "no longer anomalous" if res["cleared"] else "STILL anomalous: the backdoor is likely still there"
    return (f"class {res['tracked']}, flagged in the received model, is at anomaly {res['anomaly']:.2f} after "
            f"purification (flag at {threshold:.2f}): {state}" + new)


def family_threshold(threshold: float, families: int) -> float:
    """The per-family flag threshold that keeps a scan over ``families`` families as likely to flag a
    clean model as one family at ``threshold`` (Bonferroni on the one-sided normal tail of the anomaly
    index): ``Phi^-1(1 - (1 - Phi(threshold)) / families)``; 2.0 -> 2.28 for two families."""
    normal = statistics.NormalDist()
    return threshold if families <= 1 else normal.inv_cdf(1 - (1 - normal.cdf(threshold)) / families)


def scan_families(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, num_classes: int,
                  families: dict[str, TriggerFamily], settings: ScanSettings | None = None, *, seed: int = 0,
                  device: str = "cpu", progress: bool = True) -> CombinedScan:
    """:func:`scan` with each family (same seed), combined (:class:`CombinedScan`); each family flags at
    :func:`family_threshold`, so that searching more families does not flag more clean models."""
    if not families:
        raise SmoothPurifyError("scan: no trigger family to search")
    settings = settings or ScanSettings()
    settings = dataclasses.replace(settings, threshold=family_threshold(settings.threshold, len(families)))
    results = {}
    for name, family in families.items():
        # A family with its own search (a class statistic, not a trigger: MM-BD's maximum margin) runs it.
        own = getattr(family, "scan", None)
        results[name] = (own(model, inputs, targets, num_classes, settings, seed=seed, device=device,
                             progress=progress) if callable(own) else
                         scan(model, inputs, targets, num_classes, family, settings, seed=seed, device=device,
                              progress=progress))
    return CombinedScan(results)
