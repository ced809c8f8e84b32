"""Figures of the run report: the verdict bars, eigenvalue densities, purification curves, t-SNE.

One figure answers one question. Curves that are compared share one panel (all spectra of an attack
in one axes); small multiples go in a grid at most ``MAX_WIDTH_IN`` wide. Every figure is checked
before it is saved: no wider than the report's page at its native size, no text under
``MIN_FONT_PT`` — so the labels stay readable where the page shows the PNG 1:1.

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
from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator

from smoothpurify.checkpoint import atomic_write

__all__ = ["plot_verdict", "plot_density", "plot_curves", "plot_tsne", "write_csv", "check_legible",
           "DPI", "MAX_WIDTH_IN", "MIN_FONT_PT"]

DPI = 110
MAX_WIDTH_IN = 9.5   # 1045 px at DPI: inside the report page (1100 px), so shown at native size
MIN_FONT_PT = 9.0
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
         "legend.fontsize": 9, "figure.titlesize": 12}
# ASR/ACC/RA are stored as fractions and drawn in percent.
PERCENT = {"asr", "acc", "ra"}
CURVE_LABELS = {"asr": "ASR %", "acc": "ACC %", "ra": "RA %", "lambda_max": "lambda_max", "val_loss": "val. loss"}
LINESTYLES = ["-", "--", "-.", ":"]


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Atomic CSV write; ``None`` becomes an empty cell."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(header)
            out.writerows(["" if v is None else v for v in row] for row in rows)
    atomic_write(Path(path), write)
    return Path(path)


def check_legible(fig: Figure) -> None:
    """Raise ``ValueError`` when the figure is wider than the page or any visible text is too small."""
    width = fig.get_figwidth()
    if width > MAX_WIDTH_IN + 1e-6:
        raise ValueError(f"figure is {width:.1f} in wide; the report page shows at most {MAX_WIDTH_IN} in")
    small = sorted({round(t.get_fontsize(), 1) for t in fig.findobj(Text)
                    if t.get_visible() and t.get_text().strip() and t.get_fontsize() < MIN_FONT_PT})
    if small:
        raise ValueError(f"figure text at {small} pt is below the {MIN_FONT_PT} pt minimum")


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    check_legible(fig)
    # No bbox "tight": the saved PNG keeps the checked width (constrained layout keeps labels inside).
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return Path(path)


def grid_shape(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def finish_grid(fig: Figure, axes: Any, used: int, legend_cols: int, title: str | None, path: Path,
                 header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """The common end of a small-multiples figure: unused cells hidden, one legend (from the first
    panel) under the grid, the title, the CSV of what was drawn, the checked PNG."""
    for ax in axes[used:]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=legend_cols)
    if title:
        fig.suptitle(title)
    write_csv(path.with_suffix(".csv"), header, rows)
    return _save(fig, path)


def _fmt(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def plot_verdict(groups: dict[str, Sequence[dict[str, Any]]], path: Path, attack_label: str, clean_label: str,
                 removed_at: float, title: str | None = None) -> Path:
    """Did it work, at a glance: per attack, the attack metric and the clean metric of the undefended
    model and of each method, side by side; a dashed line at the "removed" threshold.

    ``groups`` maps an attack to rows with ``method``, ``attack`` (the attack metric, display units),
    ``clean`` and ``status`` (the verdict word).
    """
    path = Path(path)
    nrows, ncols = grid_shape(len(groups), 2)
    with rc_context(STYLE):
        fig = Figure(figsize=(MAX_WIDTH_IN if ncols > 1 else 7.5, 0.4 + 3.3 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        rows = []
        for ax, (attack, items) in zip(axes, groups.items()):
            x = np.arange(len(items))
            a = [np.nan if r["attack"] is None else r["attack"] for r in items]
            c = [np.nan if r["clean"] is None else r["clean"] for r in items]
            ax.bar(x - 0.2, a, 0.4, color="#c0392b", label=attack_label)
            ax.bar(x + 0.2, c, 0.4, color="#2e86c1", label=clean_label)
            ax.axhline(removed_at, color="black", ls="--", lw=1, label=f"removed at {attack_label} <= {removed_at:g}")
            ax.set_xticks(x, [r["method"] + ("\n" + r["status"] if r.get("status") else "") for r in items],
                          rotation=30 if len(items) > 5 else 0, ha="right" if len(items) > 5 else "center")
            ax.set_title(attack)
            ax.set_ylim(0, 105)
            ax.grid(axis="y", alpha=0.3)
            rows += [(attack, r["method"], r.get("status", ""), r["attack"], r["clean"]) for r in items]
        return finish_grid(fig, axes, len(groups), 3, title, path,
                            ["attack", "method", "verdict", attack_label, clean_label], rows)


def plot_density(series: Sequence[dict[str, Any]], path: Path, title: str | None = None) -> Path:
    """Eigenvalue densities of H of every model of one attack in one panel (SFT Fig. 1a-b).

    ``series``: dicts with ``label``, ``grid``, ``values`` (density), and optionally ``lambda_max``,
    ``trace_h``, ``trace_h_stderr`` (in the legend). Shared axes are what lets a reader compare the
    benign, backdoored and purified spectra. The x axis is symmetric-log: linear near zero where the
    bulk sits, logarithmic beyond, so a sharp model's outliers and a smooth model's narrow
    spectrum both stay visible. The y axis is logarithmic because the bulk dwarfs the outliers.
    """
    if not series:
        raise ValueError("plot_density needs at least one series")
    path = Path(path)
    floor = 1e-7
    span = max(float(np.max(np.abs(np.asarray(s["grid"], float)))) for s in series) or 1.0
    cmap = colormaps["tab10"]
    with rc_context(STYLE):
        fig = Figure(figsize=(8.5, 4.6), layout="constrained")
        ax = fig.subplots()
        rows = []
        for i, s in enumerate(series):
            grid, values = np.asarray(s["grid"], float), np.asarray(s["values"], float)
            label = (f"{s['label']}: $\\lambda_{{max}}$ {_fmt(s.get('lambda_max'), 3)}, "
                     f"Tr(H) {_fmt(s.get('trace_h'), 3)} ± {_fmt(s.get('trace_h_stderr'), 2)}")
            ax.plot(grid, np.maximum(values, floor), lw=1.4, color=cmap(i % 10), ls=LINESTYLES[(i // 10) % 4],
                    label=label)
            rows += [(s["label"], s.get("lambda_max"), s.get("trace_h"), s.get("trace_h_stderr"), g, v)
                     for g, v in zip(grid.tolist(), values.tolist())]
        ax.set_yscale("log")
        ax.set_xscale("symlog", linthresh=max(span * 1e-3, 1e-6))
        ax.set_ylim(bottom=floor)
        ax.set_xlabel("eigenvalue (symmetric log scale)")
        ax.set_ylabel("density (log)")
        ax.grid(alpha=0.3)
        fig.legend(loc="outside lower center", ncols=1)
        if title:
            ax.set_title(title)
        write_csv(path.with_suffix(".csv"),
                  ["model", "lambda_max", "trace_h", "trace_h_stderr", "eigenvalue", "density"], rows)
        return _save(fig, path)


def plot_curves(series: dict[str, Sequence[dict[str, Any]]], path: Path, title: str | None = None,
                metrics: Sequence[str] = ("asr", "acc", "lambda_max", "val_loss")) -> Path:
    """Purification curves: a 2-column grid with one panel per metric present, one line per method
    (same colour in every panel, one legend), x = epoch.

    ``series`` maps a method to its record's ``curves`` (dicts with ``epoch`` and metrics).
    """
    path = Path(path)
    present = [m for m in metrics if any(p.get(m) is not None for pts in series.values() for p in pts)]
    if not present:
        raise ValueError("plot_curves: no metric to draw (curves are empty)")
    nrows, ncols = grid_shape(len(present), 2)
    cmap = colormaps["tab10"]
    with rc_context(STYLE):
        fig = Figure(figsize=(8.5 if ncols > 1 else 5.5, 0.8 + 2.9 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, metric in zip(axes, present):
            scale = 100.0 if metric in PERCENT else 1.0
            for i, (label, pts) in enumerate(series.items()):
                xy = [(p["epoch"], scale * p[metric]) for p in pts if p.get(metric) is not None]
                if xy:
                    ax.plot(*zip(*xy), marker="o", ms=3, lw=1.3, color=cmap(i % 10), label=label)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(CURVE_LABELS.get(metric, metric))
            ax.grid(alpha=0.3)
        fields = ["epoch", "val_loss", "acc", "asr", "ra", "lambda_max"]
        return finish_grid(fig, axes, len(present), min(4, max(1, len(axes[0].get_legend_handles_labels()[1]))),
                            title, path, ["method", *fields],
                            [(label, *(p.get(f) for f in fields)) for label, pts in series.items() for p in pts])


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
    """t-SNE of penultimate features per model (SFT Fig. 3), poisoned samples marked; a grid of at
    most 4 columns.

    ``panels`` maps a model label to its ``[n, d]`` features of the same ``n`` samples;
    ``labels`` are their true classes, ``poisoned`` a bool mask. Clean samples are coloured by
    class; poisoned ones are black crosses, so a backdoor shows as one tight cross cluster that
    purification should scatter back into the true-class clusters.
    """
    path = Path(path)
    labels, poisoned = np.asarray(labels), np.asarray(poisoned, dtype=bool)
    if labels.ndim > 1:  # multi-hot targets: colour by the first category present
        labels = labels.reshape(len(labels), -1).argmax(axis=1)
    nrows, ncols = grid_shape(len(panels), 4)
    cmap = colormaps["tab10"]
    with rc_context(STYLE):
        fig = Figure(figsize=(min(MAX_WIDTH_IN, 2.35 * ncols), 0.9 + 2.35 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        rows = []
        for ax, (label, feats) in zip(axes, panels.items()):
            xy = tsne_embed(feats, seed)
            clean = ~poisoned
            ax.scatter(xy[clean, 0], xy[clean, 1], c=[cmap(int(c) % 10) for c in labels[clean]], s=8, alpha=0.8,
                       label="clean (colour = true class)")
            if poisoned.any():
                ax.scatter(xy[poisoned, 0], xy[poisoned, 1], c="black", marker="x", s=12, lw=0.8,
                           label="poisoned input")
            ax.set_title(label, fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            rows += [(label, float(a), float(b), int(c), int(p)) for (a, b), c, p in zip(xy, labels, poisoned)]
        return finish_grid(fig, axes, len(panels), 2, title, path, ["model", "x", "y", "true_label", "poisoned"],
                            rows)
