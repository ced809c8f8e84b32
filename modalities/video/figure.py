"""The report's picture of a trigger: a strip of the frames of one clean test clip above the same
clip with the attack applied."""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from smoothpurify.checkpoint import atomic_write

# The report's page limits (pipeline/report/plots.py): at most 9.5 in wide, text at least 9 pt.
WIDTH_IN, FONT_PT, DPI = 9.0, 10, 110


def draw_clip_strip(clean: torch.Tensor, triggered: torch.Tensor, path: Path, title: str) -> Path:
    """``clean`` / ``triggered``: one clip each, ``[C, T, H, W]`` in [0, 1]; writes a PNG atomically."""
    rows = [clean.detach().cpu().float(), triggered.detach().cpu().float()]
    t = rows[0].shape[1]
    fig = Figure(figsize=(WIDTH_IN, WIDTH_IN / t * 2 + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, t, squeeze=False)
    for r, (clip, label) in enumerate(zip(rows, ("clean", "triggered"))):
        for k in range(t):
            frame = clip[:, k].permute(1, 2, 0).clamp(0, 1).numpy()
            ax = axes[r][k]
            ax.imshow(frame[..., 0] if frame.shape[-1] == 1 else frame, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={k}", fontsize=FONT_PT)
            if k == 0:
                ax.set_ylabel(label, fontsize=FONT_PT)
    fig.suptitle(title, fontsize=FONT_PT + 1)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path
