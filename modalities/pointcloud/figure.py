"""The report's picture of a trigger: one clean test cloud and the same cloud with the attack applied,
drawn as 3D scatter plots side by side (points the attack moved or inserted in red)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from smoothpurify.checkpoint import atomic_write

# The report's page limits (pipeline/report/plots.py): at most 9.5 in wide, text at least 9 pt.
WIDTH_IN, FONT_PT, DPI = 8.0, 10, 110


def draw_clean_and_triggered(clean: torch.Tensor, triggered: torch.Tensor, path: Path, title: str) -> Path:
    """``clean`` and ``triggered``: one cloud each, ``[3, P]``; writes a PNG atomically and returns its path."""
    c, t = clean.detach().cpu().numpy(), triggered.detach().cpu().numpy()
    moved = np.abs(c - t).max(axis=0) > 1e-6
    fig = Figure(figsize=(WIDTH_IN, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (pts, label) in enumerate(((c, "clean"), (t, "triggered"))):
        ax = fig.add_subplot(1, 2, k + 1, projection="3d")
        colours = np.where(moved, "tab:red", "tab:blue") if k else np.full(pts.shape[1], "tab:blue")
        ax.scatter(pts[0], pts[1], pts[2], s=4, c=colours, depthshade=False)
        ax.set(xlim=(0, 1), ylim=(0, 1), zlim=(0, 1))
        ax.set_title(label if k == 0 else f"{label} ({int(moved.sum())} points changed)", fontsize=FONT_PT)
        ax.tick_params(labelsize=FONT_PT - 1 if FONT_PT - 1 >= 9 else 9)
        ax.set_xticks([0, 1]), ax.set_yticks([0, 1]), ax.set_zticks([0, 1])
    fig.suptitle(title, fontsize=FONT_PT + 1)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path
