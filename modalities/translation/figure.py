"""The report's example translations (the modality's ``trigger_figure`` hook): a few test sources,
clean and with the trigger word, translated by the backdoored model and by each purified model,
drawn as a text table (the report embeds figures, so a table of text is drawn as one)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from smoothpurify.checkpoint import atomic_write

WIDTH_IN, FONT_PT, DPI = 9.0, 9, 110  # the report's page limits (pipeline/report/plots.py)


def draw_examples(blocks: list[tuple[str, list[tuple[str, str]]]], path: Path, title: str) -> Path:
    """``blocks``: ``(heading, [(label, text), ...])``; writes a PNG atomically and returns its path."""
    lines: list[tuple[str, bool]] = []
    for heading, rows in blocks:
        lines.append((heading, True))
        for label, text in rows:
            wrapped = textwrap.wrap(f"{label}: {text}", 120) or [f"{label}:"]
            lines += [(w if k == 0 else "      " + w, False) for k, w in enumerate(wrapped)]
        lines.append(("", False))
    height = 0.8 + 0.19 * len(lines)
    fig = Figure(figsize=(WIDTH_IN, height))
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=FONT_PT + 2)
    for k, (text, bold) in enumerate(lines):
        fig.text(0.02, 1 - (0.5 + 0.19 * (k + 1)) / height, text, fontsize=FONT_PT,
                 fontweight="bold" if bold else "normal", family="monospace" if not bold else None)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path
