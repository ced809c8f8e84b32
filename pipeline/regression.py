"""Regression check: a run's metrics against the last accepted ones, by each metric's direction.

The accepted numbers are a versioned file (``regression/<modality>.json``, committed): per cell
(``<attack>-<benign|backdoored|method>``, the flat files ``runs/<m>/metrics/cells/*.json`` that the
pipeline writes) the value of each metric in percent. A cell regresses when a metric with role
``attack`` (ASR) rises, or one with role ``clean`` (ACC, mAP, BLEU) falls, by more than its tolerance
in points (``regression.tolerance`` in params.yaml). Metrics of role ``other`` are shown, never judged.
A cell that was accepted and is missing now is a failure too: a method that stopped running is a
regression. ``accept`` writes the current numbers as the new reference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smoothpurify import SmoothPurifyError
from smoothpurify.metrics import Metric

DEFAULT_TOLERANCE = {"attack": 5.0, "clean": 2.0}  # points


@dataclass
class Finding:
    cell: str
    metric: str
    accepted: float | None
    current: float | None
    why: str

    def line(self) -> str:
        if self.current is None:
            return f"{self.cell}: missing ({self.why})"
        return f"{self.cell}: {self.metric} {self.accepted:.2f} -> {self.current:.2f} ({self.why})"


def collect(cells_dir: Path) -> dict[str, dict[str, float]]:
    """Every cell's metrics from ``runs/<m>/metrics/cells``."""
    if not cells_dir.is_dir():
        raise SmoothPurifyError(f"no metrics under {cells_dir}: run the pipeline first")
    out = {}
    for path in sorted(cells_dir.glob("*.json")):
        values = json.loads(path.read_text())
        if isinstance(values, dict):
            out[path.stem] = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
    if not out:
        raise SmoothPurifyError(f"no metrics under {cells_dir}: run the pipeline first")
    return out


def compare(current: dict[str, dict[str, float]], accepted: dict[str, dict[str, float]],
            metrics: tuple[Metric, ...], tolerance: dict[str, float] | None = None) -> list[Finding]:
    """What got worse beyond the tolerance (an empty list: no regression)."""
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    judged = {m.key: m for m in metrics if m.role in ("attack", "clean")}
    findings = []
    for cell, ref in sorted(accepted.items()):
        now = current.get(cell)
        if now is None:
            findings.append(Finding(cell, "", None, None, "accepted, not in this run"))
            continue
        for key, metric in judged.items():
            if key not in ref:
                continue
            if key not in now:
                findings.append(Finding(cell, key, ref[key], None, f"{metric.label} no longer reported"))
                continue
            worse = ref[key] - now[key] if metric.higher_is_better else now[key] - ref[key]
            if worse > tol[metric.role]:
                direction = "fell" if metric.higher_is_better else "rose"
                findings.append(Finding(cell, metric.label, ref[key], now[key],
                                        f"{direction} {worse:.2f} points; tolerance {tol[metric.role]:g}"))
    return findings


def load_accepted(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SmoothPurifyError(f"no accepted metrics at {path}: run `smoothpurify regression --accept` once")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("cells"), dict):
        raise SmoothPurifyError(f"{path}: not an accepted-metrics file (no 'cells')")
    return data


def accept(current: dict[str, dict[str, float]], path: Path, note: str = "") -> None:
    """Write ``current`` as the accepted reference (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"note": note, "cells": current}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
