"""The backdoor scan for a user's checkpoint or a pipeline model: clean data only (smoothpurify.scan).

The trigger families come from the modality (``Modality.scan_family()``, optional: one family);
without it, inputs shaped like images or clips (``[..., C, H, W]``) are searched with two: Neural
Cleanse's mask and pattern (a patch: BadNets, Trojan, a warp's local edits) and a universal additive
perturbation (a whole-image blend or signal: Blend, SIG), and anything else with the additive one.
Every continuous input also gets MM-BD's maximum-margin statistic (``margin``), which assumes no
trigger shape (an input-specific trigger, a warp) and uses only the clean inputs' range, and the
per-sample family (``per-sample``: the median minimal perturbation to each class, input by input),
which weighs most in what a purification removed (:func:`removal`).
``scan_model`` is what ``smoothpurify scan``, ``purify --scan`` and ``--method auto`` run; it writes
``scan.json`` and a figure of the synthesised triggers per family.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from modalities.contract import Modality
from pipeline.params import file_hash, fingerprint
from pipeline.run import Run
from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import atomic_write, write_json
from smoothpurify.max_margin import MaxMargin
from smoothpurify.per_sample import PerSample
from smoothpurify.scan import (Additive, ClassTrigger, CombinedScan, MaskPattern, ScanResult, ScanSettings, TriggerFamily,
                               scan_families)
from smoothpurify.scan_reference import ReferencedScan, ReferenceTraining, train_reference


def trigger_families(mod: Modality, example: torch.Tensor) -> dict[str, TriggerFamily]:
    own = getattr(mod, "scan_family", None)
    if own is not None:
        return {"own": own(), "margin": MaxMargin(), "per-sample": PerSample()}
    shaped = {"mask": MaskPattern(), "additive": Additive()} if example.dim() >= 3 else {"additive": Additive()}
    return {**shaped, "margin": MaxMargin(), "per-sample": PerSample()}


def scan_model(mod: Modality, model: nn.Module, clean: tuple[torch.Tensor, torch.Tensor], num_classes: int, *,
               settings: ScanSettings | None = None, seed: int = 0, device: str = "cpu",
               progress: bool = True, families: list[str] | None = None,
               reference: bool | CombinedScan = False) -> CombinedScan | ReferencedScan:
    """Scan with the modality's families (``families`` picks some of them by name). ``reference``: judge
    the scan against a clean reference (:mod:`smoothpurify.scan_reference`): ``True`` trains one from
    ``model``'s architecture and ``clean`` and scans it; a :class:`CombinedScan` is such a reference's
    scan, done before (:func:`reference_scan`; a purification's before/after share one)."""
    if reference is True:
        reference = reference_scan(mod, model, clean, num_classes, settings=settings, seed=seed, device=device,
                                   progress=progress, families=families)
    own = _scan(mod, model, clean, num_classes, settings=settings, seed=seed, device=device, progress=progress,
                families=families)
    return ReferencedScan(own, reference) if isinstance(reference, CombinedScan) else own


def scanner(mod: Modality, clean: tuple[torch.Tensor, torch.Tensor], num_classes: int, *, reference: bool,
            settings: ScanSettings | None = None, seed: int = 0, device: str = "cpu", progress: bool = True,
            families: list[str] | None = None) -> Callable[[nn.Module], CombinedScan | ReferencedScan]:
    """``model -> scan`` for scanning several models on the same clean data (a purification's received
    and purified models, ``--method auto``'s candidates): with ``reference`` the clean reference is
    trained and scanned once, at the first call (from that model's architecture), and judges them all."""
    shared: dict[str, CombinedScan] = {}

    def scan_one(model: nn.Module) -> CombinedScan | ReferencedScan:
        if reference and "ref" not in shared:
            shared["ref"] = reference_scan(mod, model, clean, num_classes, settings=settings, seed=seed,
                                           device=device, progress=progress, families=families)
        return scan_model(mod, model, clean, num_classes, settings=settings, seed=seed, device=device,
                          progress=progress, families=families, reference=shared.get("ref", False))

    return scan_one


def reference_scan(mod: Modality, model: nn.Module, clean: tuple[torch.Tensor, torch.Tensor], num_classes: int, *,
                   settings: ScanSettings | None = None, seed: int = 0, device: str = "cpu", progress: bool = True,
                   families: list[str] | None = None,
                   training: ReferenceTraining | None = None) -> CombinedScan:
    """Train the clean reference (``model``'s architecture, re-initialised, trained on ``clean`` with the
    modality's augmentation) and scan it exactly as the model will be scanned."""
    _families(mod, clean, families)
    training = training or ReferenceTraining(seed=seed)
    ref = train_reference(model, clean[0], clean[1], mod.likelihood, augment=mod.augment, settings=training,
                          device=device, progress=progress)
    return _scan(mod, ref, clean, num_classes, settings=settings, seed=seed, device=device, progress=progress,
                 families=families)


def _families(mod: Modality, clean: tuple[Any, torch.Tensor], families: list[str] | None) -> dict[str, TriggerFamily]:
    """The families to search, or why these data cannot be scanned (before any training or search)."""
    x, y = clean
    if y.dim() != 1:
        raise SmoothPurifyError("the scan needs single-label clean data (one class per input)")
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        # A trigger word is a discrete edit: the continuous search would have to run in the model's
        # embedding space and map back to tokens, which is not built.
        raise SmoothPurifyError("the scan searches continuous triggers (images, clips, point clouds); token "
                                "inputs would need a search in the embedding space, which is not built")
    chosen = trigger_families(mod, x[0])
    if families:
        unknown = sorted(set(families) - set(chosen))
        if unknown:
            raise SmoothPurifyError(f"unknown trigger family {', '.join(unknown)}; this model's: {', '.join(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in families}
    return chosen


def _scan(mod: Modality, model: nn.Module, clean: tuple[torch.Tensor, torch.Tensor], num_classes: int, *,
          settings: ScanSettings | None, seed: int, device: str, progress: bool,
          families: list[str] | None) -> CombinedScan:
    return scan_families(model, clean[0], clean[1], num_classes, _families(mod, clean, families), settings,
                         seed=seed, device=device, progress=progress)


def removal(received: CombinedScan | ReferencedScan, purified: CombinedScan | ReferencedScan) -> ReferencedScan:
    """The received model's scan judged against the purified model's (each family's anomaly index of
    ``log size_t(received) - log size_t(purified)``, summed over families, the 5 % null threshold;
    :class:`ReferencedScan`). The purified model shares the received one's data, architecture and
    natural hubs but not the backdoor it lost, so a flag names the class the purification made much
    harder to reach: the removed backdoor's target."""
    unwrap = lambda s: s.scanned if isinstance(s, ReferencedScan) else s  # noqa: E731
    return ReferencedScan(unwrap(received), unwrap(purified), reference_label="the purified model")


def scan_from_record(record: dict[str, Any]) -> CombinedScan:
    """A :class:`CombinedScan` back from its ``scan.json`` record (sizes, success, anomaly per family)."""
    results = {}
    for name, fam in record["families"].items():
        triggers = [ClassTrigger(t, math.inf if size is None else float(size), float(ok))
                    for t, (size, ok) in enumerate(zip(fam["sizes"], fam["success"]))]
        results[name] = ScanResult(triggers, list(fam["anomaly"]), fam["suspected"], fam["threshold"],
                                   float(fam.get("seconds", 0.0)))
    return CombinedScan(results)


def removal_line(judged: ReferencedScan) -> str:
    """:func:`removal` in words."""
    top, z = judged.top, judged.max_anomaly
    if judged.flagged:
        return (f"class {top} became {z:.1f} combined MADs harder to reach through the purification (flag at "
                f"{judged.threshold:.2f}): a sign that the received model held a backdoor to class {top} and the "
                "purification removed it (a natural hub that the new classifier flattened can look the same: "
                "README, 'What the purification removed')")
    return (f"no class became much harder to reach through the purification (largest: class {top} at {z:.1f}, "
            f"flag at {judged.threshold:.2f}): no sign that the received model held a backdoor it removed")


def save_scan(result: CombinedScan, out_dir: Path, title: str = "") -> dict[str, Any]:
    """``scan.json`` (record) and ``triggers-<family>.png`` (one panel per class) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = result.to_record()
    figures = [str(f) for name, r in result.results.items()
               if (f := plot_triggers(r, out_dir / f"triggers-{name}.png", f"{title}: {name} triggers" if title else ""))]
    if figures:
        record["figures"] = figures
    atomic_write(out_dir / "scan.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return record


def plot_triggers(result: ScanResult, path: Path, title: str = "") -> Path | None:
    """The synthesised trigger (mask x pattern) of each class, its size and anomaly; the flagged
    class framed in red. Only for image-like triggers."""
    pictures = [t.picture.get("trigger") for t in result.triggers]
    if not any(p is not None and p.dim() == 3 for p in pictures):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(pictures)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for t, (ax, pic) in enumerate(zip(axes.flat, pictures)):
        if pic is None or pic.dim() != 3:
            ax.set_title(f"class {t}\nnot reached", fontsize=9)
            continue
        img = pic.permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        size = result.triggers[t].size
        ax.set_title(f"class {t}\n" + (f"{result.value_label(t)}, A {result.anomaly[t]:.1f}" if math.isfinite(size)
                                       else "not reached"), fontsize=9,
                     color="red" if t == result.suspected else "black")
        if t == result.suspected:
            for side in ax.spines.values():
                side.set_visible(True)
                side.set_color("red")
                side.set_linewidth(2)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or f"synthesised triggers; flag at anomaly > {result.threshold:.2f}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def scan_lines(result: CombinedScan, label: str) -> list[str]:
    """What the terminal shows: the risk in words and the per-class numbers of each family."""
    lines = [f"{label}: backdoor risk {result.risk()}"]
    combined = getattr(result, "combined", None)  # a ReferencedScan
    for name, r in result.results.items():
        sizes = " ".join(f"{t.size:.3g}" if t.size != float("inf") else "inf" for t in r.triggers)
        anomaly = " ".join(f"{a:.1f}" for a in r.anomaly)
        lines += [f"  {name}: trigger size per class: {sizes}",
                  f"  {name}: anomaly index per class{' (against the reference)' if combined else ''}: {anomaly} "
                  f"({r.seconds:.0f} s)"]
    if combined:
        lines.append(f"  combined over the families (Stouffer): {' '.join(f'{z:.1f}' for z in combined)}; flag at "
                     f"{result.threshold:.2f} ({result.fpr:.0%} of clean models); the reference's training and "
                     f"scan took {result.reference.seconds:.0f} s")
    return lines


def scan_settings(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's ``scan`` section with its defaults: ``enabled`` (false), ``steps`` (120, the trigger
    searches), ``margin_steps`` (600, the maximum-margin statistic), ``per_sample_steps`` (100, the
    per-sample family), ``families`` (null: all of the modality's)."""
    keys = ("enabled", "steps", "margin_steps", "per_sample_steps", "families")
    section = {"enabled": False, "steps": 120, "margin_steps": 600, "per_sample_steps": 100, "families": None,
               **(params.get("scan") or {})}
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise SmoothPurifyError(f"params scan: unknown key(s) {', '.join(unknown)} ({', '.join(keys)})")
    if int(section["steps"]) < 10:
        raise SmoothPurifyError("params scan.steps must be at least 10 (the trigger cost is adapted every 10 steps)")
    if int(section["margin_steps"]) < 1:
        raise SmoothPurifyError("params scan.margin_steps must be at least 1")
    if int(section["per_sample_steps"]) < 1:
        raise SmoothPurifyError("params scan.per_sample_steps must be at least 1")
    return section


def scan_stage(modality: str, params: dict[str, Any], attack: str, model_name: str, force: bool = False,
               progress: bool = True) -> dict[str, Any]:
    """Scan ``backdoored`` (the attack's model) or ``purified/<method>`` on the clean validation split.

    Writes ``metrics/scan/<attack>-<model>.json`` and the trigger figures under ``scan/<attack>/<model>/``;
    with ``scan.enabled`` false it records only that (DVC's stage then costs nothing).
    """
    run = Run(modality, params)
    settings = scan_settings(params)
    model_dir = run.analysed_model_dir(attack, model_name)
    path = run.scan_record(attack, model_name)
    if not settings["enabled"]:
        write_json(path, {"enabled": False})
        return {"enabled": False}
    fp = fingerprint(settings, run.seed, file_hash(model_dir / "model.safetensors"), file_hash(run.data_json))
    old = run.read_json(path) if path.is_file() else None
    if not force and old and old.get("fingerprint") == fp:
        return old
    mod = run.modality
    model = mod.load_model(model_dir)[0]
    x, y = mod.load_split(run.data_dir, "val")
    if y.dim() != 1:
        record = {"enabled": True, "skipped": "multi-label data: the scan needs one class per input", "fingerprint": fp}
        write_json(path, record)
        return record
    result = scan_model(mod, model, (x, y), int(run.data_meta().get("num_classes") or int(y.max()) + 1),
                        settings=ScanSettings(steps=int(settings["steps"]), margin_steps=int(settings["margin_steps"]),
                                              per_sample_steps=int(settings["per_sample_steps"])),
                        seed=run.seed, device=run.device,
                        progress=progress, families=settings["families"])
    slug = path.stem[len(attack) + 1:]  # backdoored | purified-<method>
    record = save_scan(result, run.root / "scan" / attack / slug, f"{attack}, {model_name}")
    record.update(enabled=True, attack=attack, model=model_name, fingerprint=fp)
    write_json(path, record)
    return record
