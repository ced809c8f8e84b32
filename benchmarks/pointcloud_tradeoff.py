"""Where each point-cloud setting of `recommended` tried on the seed-1 40-epoch models landed: ASR after
purification against the ACC it cost, one point per attack, the issue's bar (ASR <= 12 %, drop <= 4)
shaded. Reads the records in benchmarks/results/pointcloud_furniture/ (nothing is run).

    python benchmarks/pointcloud_tradeoff.py      # writes results/pointcloud_furniture/tradeoff-seed1.png
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend choice

RESULTS = Path(__file__).parent / "results" / "pointcloud_furniture"
ATTACKS = ("pointba-i", "pointba-o", "pointcba", "3dpc-ba")
BAR_ASR, BAR_DROP = 12.0, 4.0
X_RANGE, Y_RANGE = (-2.0, 14.0), (0.0, 105.0)
# candidate label -> a run summary (``summary.json`` of a flow run) or a prefix of per-cell purify records
SUMMARIES = {"today (distillation 10)": "teacher/seed1-today-d10.json", "distillation 20": "teacher/seed1-d20.json",
             "lr 0.0025": "gentle/seed1-lr0.0025.json", "feature shift 1": "gentle/seed1-shift1.json"}
CELLS = {"turns about the up axis (R)": "views/seed1-cR1-", "teacher on mixed clouds (M)": "views/seed1-cM1-",
         "head fitted first, LP-FT (H)": "views/seed1-cH1-",
         "no overlay (diagnostic)": "diagnostics-terms/seed1-dO0-",
         "no feature shift (diagnostic)": "diagnostics-terms/seed1-dS0-"}


def from_summary(path: Path) -> list[tuple[float, float]]:
    """(ACC drop, ASR) per attack from a flow's summary.json: `recommended` against `no defense`."""
    rows = json.loads(path.read_text())["purification"]
    by = {(r["attack"], r["method"]): r for r in rows}
    return [(float(by[a, "no defense"]["acc"]) - float(by[a, "recommended"]["acc"]), float(by[a, "recommended"]["asr"]))
            for a in ATTACKS if (a, "recommended") in by]


def from_cells(prefix: str) -> list[tuple[float, float]]:
    """(ACC drop, ASR) per attack from per-cell purify records (``before`` / ``after``, fractions)."""
    out = []
    for attack in ATTACKS:
        path = RESULTS / f"{prefix}{attack}-recommended.json"
        if path.exists():
            d = json.loads(path.read_text())
            out.append((100 * (d["before"]["acc"] - d["after"]["acc"]), 100 * d["after"]["asr"]))
    return out


def main() -> Path:
    points = {k: from_summary(RESULTS / v) for k, v in SUMMARIES.items()}
    points.update({k: from_cells(v) for k, v in CELLS.items()})
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.axvspan(X_RANGE[0], BAR_DROP, ymax=(BAR_ASR - Y_RANGE[0]) / (Y_RANGE[1] - Y_RANGE[0]), color="tab:green",
               alpha=0.15, label="the issue's bar")
    for (label, pts), marker in zip(points.items(), itertools.cycle("os^vDPhX*")):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=45, label=f"{label}: "
                   f"{sum(d <= BAR_DROP and a <= BAR_ASR for d, a in pts)} of {len(pts)} at the bar")
    ax.set(xlim=X_RANGE, ylim=Y_RANGE, xlabel="ACC drop against the backdoored model (points)",
           ylabel="ASR after purification (%)",
           title="Point clouds, seed-1 40-epoch victims: `recommended` settings tried (4 attacks each)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    out = RESULTS / "tradeoff-seed1.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    print(main())
