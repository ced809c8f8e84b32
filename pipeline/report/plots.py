"""Figures of the run report: eigenvalue density, purification curves, t-SNE of features.

Each function writes a PNG and, next to it, a CSV of exactly the numbers drawn (same stem), so a
figure can be re-plotted or diffed without rerunning anything. Figures are built on
``matplotlib.figure.Figure`` with the Agg canvas, never pyplot: no global backend switch, no
display needed, safe in worker threads.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from smoothpurify.checkpoint import atomic_write

__all__ = ["plot_density", "plot_curves", "plot_tsne", "write_csv"]

# ASR/ACC/RA are stored as fractions and drawn in percent.
PERCENT = {"asr", "acc", "ra"}
CURVE_LABELS = {"asr": "ASR %", "acc": "ACC %", "ra": "RA %", "lambda_max": "lambda_max", "val_loss": "val. loss"}


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Atomic CSV write; ``None`` becomes an empty cell."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(header)
            out.writerows(["" if v is None else v for v in row] for row in rows)
    atomic_write(Path(path), write)
    return Path(path)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return Path(path)


def _fmt(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def plot_density(series: Sequence[dict[str, Any]], path: Path, title: str | None = None) -> Path:
    """Eigenvalue density of H per model (SFT Fig. 1a-b), one panel each, shared log y axis.

    ``series``: dicts with ``label``, ``grid``, ``values`` (density), and optionally
    ``lambda_max``, ``trace_h``, ``trace_h_stderr`` shown in the legend. Each panel keeps its own
    eigenvalue range, as in the paper: a shared x axis squeezes a smooth model's spectrum into one
    line. The y axis is logarithmic because the bulk near zero dwarfs the outliers otherwise.
    """
    if not series:
        raise ValueError("plot_density needs at least one series")
    path = Path(path)
    fig = Figure(figsize=(4.2 * len(series), 3.6), layout="constrained")
    axes = fig.subplots(1, len(series), sharey=True, squeeze=False)[0]
    floor = 1e-7
    rows = []
    for ax, s in zip(axes, series):
        grid, values = np.asarray(s["grid"], float), np.asarray(s["values"], float)
        legend = (f"$\\lambda_{{max}}$ = {_fmt(s.get('lambda_max'))}\n"
                  f"Tr(H) = {_fmt(s.get('trace_h'))} ± {_fmt(s.get('trace_h_stderr'), 2)}")
        ax.semilogy(grid, np.maximum(values, floor), lw=1.2, label=legend)
        ax.set_title(s["label"], fontsize=10)
        ax.set_xlabel("eigenvalue")
        ax.legend(loc="upper right", fontsize=8, handlelength=0, handletextpad=0)
        ax.grid(alpha=0.3)
        rows += [(s["label"], s.get("lambda_max"), s.get("trace_h"), s.get("trace_h_stderr"), g, v)
                 for g, v in zip(grid.tolist(), values.tolist())]
    axes[0].set_ylabel("density (log)")
    axes[0].set_ylim(bottom=floor)
    if title:
        fig.suptitle(title, fontsize=11)
    write_csv(path.with_suffix(".csv"), ["model", "lambda_max", "trace_h", "trace_h_stderr", "eigenvalue", "density"],
              rows)
    return _save(fig, path)


def plot_curves(series: dict[str, Sequence[dict[str, Any]]], path: Path, title: str | None = None,
                metrics: Sequence[str] = ("asr", "acc", "lambda_max", "val_loss")) -> Path:
    """Purification curves: one panel per metric present, one line per method, x = epoch.

    ``series`` maps a method to its record's ``curves`` (dicts with ``epoch`` and metrics).
    """
    path = Path(path)
    present = [m for m in metrics if any(p.get(m) is not None for pts in series.values() for p in pts)]
    if not present:
        raise ValueError("plot_curves: no metric to draw (curves are empty)")
    fig = Figure(figsize=(3.8 * len(present), 3.2), layout="constrained")
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, metric in zip(axes, present):
        scale = 100.0 if metric in PERCENT else 1.0
        for label, pts in series.items():
            xy = [(p["epoch"], scale * p[metric]) for p in pts if p.get(metric) is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", ms=3, lw=1.2, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(CURVE_LABELS.get(metric, metric), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fields = ["epoch", "val_loss", "acc", "asr", "ra", "lambda_max"]
    write_csv(path.with_suffix(".csv"), ["method", *fields],
              [(label, *(p.get(f) for f in fields)) for label, pts in series.items() for p in pts])
    return _save(fig, path)


def tsne_embed(features: Any, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of ``[n, d]`` features (flattened); perplexity capped for small batches."""
    from sklearn.manifold import TSNE  # slow import, only when a t-SNE is drawn
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    # One thread: for a few hundred points Barnes-Hut's OpenMP threads only add hand-offs (0.6 s
    # alone vs 35 s on a busy 2-core machine), and a single thread makes the embedding reproducible.
    with threadpool_limits(1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_tsne(panels: dict[str, Any], labels: Any, poisoned: Any, path: Path, title: str | None = None,
              seed: int = 0) -> Path:
    """t-SNE of penultimate features per model (SFT Fig. 3), poisoned samples marked.

    ``panels`` maps a model label to its ``[n, d]`` features of the same ``n`` samples;
    ``labels`` are their true classes, ``poisoned`` a bool mask. Clean samples are coloured by
    class; poisoned ones are black crosses, so a backdoor shows as one tight cross cluster that
    purification should scatter back into the true-class clusters.
    """
    path = Path(path)
    labels, poisoned = np.asarray(labels), np.asarray(poisoned, dtype=bool)
    if labels.ndim > 1:  # multi-hot targets: colour by the first category present
        labels = labels.reshape(len(labels), -1).argmax(axis=1)
    fig = Figure(figsize=(4.2 * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rows = []
    cmap = colormaps["tab10"]
    for ax, (label, feats) in zip(axes, panels.items()):
        xy = tsne_embed(feats, seed)
        clean = ~poisoned
        colors = [cmap(int(c) % 10) for c in labels[clean]]
        ax.scatter(xy[clean, 0], xy[clean, 1], c=colors, s=10, alpha=0.8, label="clean (colour = class)")
        if poisoned.any():
            ax.scatter(xy[poisoned, 0], xy[poisoned, 1], c="black", marker="x", s=14, lw=0.8, label="poisoned")
        ax.set_title(label, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        rows += [(label, float(a), float(b), int(c), int(p)) for (a, b), c, p in zip(xy, labels, poisoned)]
    axes[0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    write_csv(path.with_suffix(".csv"), ["model", "x", "y", "true_label", "poisoned"], rows)
    return _save(fig, path)
