"""The backdoor scan for a user's checkpoint or a pipeline model: clean data only (smoothpurify.scan).

The trigger family comes from the modality (``Modality.scan_family()``, optional); without it,
inputs shaped like images or clips (``[..., C, H, W]``) get Neural Cleanse's mask and pattern, and
anything else a universal additive perturbation. ``scan_model`` is what ``smoothpurify scan`` and
``smoothpurify purify --scan`` run; it writes ``scan.json`` and a figure of the synthesised triggers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalities.contract import Modality
from smoothpurify.scan import Additive, MaskPattern, ScanResult, ScanSettings, TriggerFamily, scan


def trigger_family(mod: Modality, example: torch.Tensor) -> TriggerFamily:
    own = getattr(mod, "scan_family", None)
    if own is not None:
        return own()
    return MaskPattern() if example.dim() >= 3 else Additive()


def scan_model(mod: Modality, model: nn.Module, clean: tuple[torch.Tensor, torch.Tensor], num_classes: int, *,
               settings: ScanSettings | None = None, seed: int = 0, device: str = "cpu",
               progress: bool = True) -> ScanResult:
    x, y = clean
    if y.dim() != 1:
        raise ValueError("the scan needs single-label clean data (one class per input)")
    return scan(model, x, y, num_classes, trigger_family(mod, x[0]), settings, seed=seed, device=device,
                progress=progress)


def save_scan(result: ScanResult, out_dir: Path, title: str = "") -> dict[str, Any]:
    """``scan.json`` (record) and ``triggers.png`` (one panel per class) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = result.to_record()
    tmp = out_dir / ".scan.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out_dir / "scan.json")
    figure = plot_triggers(result, out_dir / "triggers.png", title)
    if figure:
        record["figure"] = str(figure)
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
        ax.set_title(f"class {t}\n" + (f"size {size:.0f}, A {result.anomaly[t]:.1f}" if math.isfinite(size)
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
    fig.suptitle(title or f"synthesised triggers; flag at anomaly > {result.threshold:g}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def scan_lines(result: ScanResult, label: str) -> list[str]:
    """What the terminal shows: the risk in words and the per-class numbers."""
    sizes = " ".join(f"{t.size:.0f}" if t.size != float("inf") else "inf" for t in result.triggers)
    anomaly = " ".join(f"{a:.1f}" for a in result.anomaly)
    return [f"{label}: backdoor risk {result.risk()}",
            f"  trigger size per class: {sizes}", f"  anomaly index per class: {anomaly} ({result.seconds:.0f} s)"]
