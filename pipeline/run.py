"""A run: one modality, its params, and every path of its folder. The only place paths are spelled.

Layout of ``<run_dir>/<modality>/``::

    cache/                                 the dataset as fetched (reused across runs)
    data/                                  train / val / test splits + data.json          (prepare)
    models/<name>/                         model.safetensors(+.json), trigger.*           (attack; "benign" or an attack)
    metrics/<attack>.json                  benign and backdoored ACC / ASR / RA           (evaluate)
    metrics/cells/<attack>-<name>.json     flat headline numbers per cell (benign, backdoored, each method; DVC)
    purified/<attack>/<method>/            the purified model                             (purify)
    metrics/purify/<attack>-<method>.json  its record
    curves/<attack>-<method>.csv           its curves (header only without curves)
    analysis/<attack>/batch.safetensors    the attack's fixed analysis batch              (analyze)
    metrics/analysis/<attack>-<model>.json one model's smoothness record
    figures/, report.md, report.html, summary.json                                         (report)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoothpurify import SmoothPurifyError
from modalities.contract import BENIGN, Attack, Modality, get_modality

BACKDOORED = "backdoored"  # the attack's own model, by a fixed name (DVC matrices stay simple)

__all__ = ["Run", "as_run", "BENIGN", "BACKDOORED"]


@dataclass
class Run:
    modality_name: str
    params: dict[str, Any]
    modality: Modality = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.modality = get_modality(self.modality_name)

    # -- settings
    @property
    def seed(self) -> int:
        return int(self.params.get("seed", 0))

    @property
    def section(self) -> dict[str, Any]:
        return self.params.get(self.modality_name, {}) or {}

    @property
    def device(self) -> str:
        return self.section.get("device", "cpu")

    # -- paths
    @property
    def root(self) -> Path:
        return Path(self.params.get("run_dir", "runs")) / self.modality_name

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def data_json(self) -> Path:
        return self.data_dir / "data.json"

    def model_dir(self, name: str) -> Path:
        """``benign`` or an attack's model."""
        return self.root / "models" / name

    def model_json(self, name: str) -> Path:
        return self.model_dir(name) / "model.json"

    def trigger_json(self, attack: str) -> Path:
        return self.model_dir(attack) / "trigger.json"

    def attack_metrics(self, attack: str) -> Path:
        return self.root / "metrics" / f"{attack}.json"

    def cell_metrics(self, attack: str, name: str) -> Path:
        """One matrix cell's headline numbers (``benign``, ``backdoored`` or a method): DVC's metrics."""
        return self.root / "metrics" / "cells" / f"{attack}-{name}.json"

    def write_cell(self, attack: str, name: str, values: dict[str, Any] | None) -> None:
        """The modality's metrics of one cell, flat and in display units (percent where the metric is),
        so that ``dvc metrics show`` is one short row per cell and ``dvc metrics diff`` reads plainly."""
        from smoothpurify.checkpoint import write_json

        if values:
            write_json(self.cell_metrics(attack, name),
                       {m.key: round(100 * float(values[m.key]), 2) if m.percent else float(values[m.key])
                        for m in self.modality.metrics if values.get(m.key) is not None})

    def purified_dir(self, attack: str, method: str) -> Path:
        return self.root / "purified" / attack / method

    def purify_metrics(self, attack: str, method: str) -> Path:
        return self.root / "metrics" / "purify" / f"{attack}-{method}.json"

    def curves_csv(self, attack: str, method: str) -> Path:
        return self.root / "curves" / f"{attack}-{method}.csv"

    def analysis_batch(self, attack: str) -> Path:
        return self.root / "analysis" / attack / "batch.safetensors"

    def analysed_model_dir(self, attack: str, model_name: str) -> Path:
        """``benign``, ``<attack>`` / ``backdoored`` or ``purified/<method>`` -> its folder."""
        if model_name == BENIGN:
            return self.model_dir(BENIGN)
        if model_name in (attack, BACKDOORED):
            return self.model_dir(attack)
        if model_name.startswith("purified/") and model_name.count("/") == 1 and model_name.split("/")[1]:
            return self.purified_dir(attack, model_name.split("/")[1])
        raise SmoothPurifyError(f"cannot analyse model {model_name!r} under attack {attack!r}; "
                                f"use 'benign', 'backdoored' (= {attack!r}) or 'purified/<method>'")

    def analysis_record(self, attack: str, model_name: str) -> Path:
        slug = BACKDOORED if model_name == attack else model_name.replace("/", "-")
        return self.root / "metrics" / "analysis" / f"{attack}-{slug}.json"

    def scan_record(self, attack: str, model_name: str) -> Path:
        slug = BACKDOORED if model_name == attack else model_name.replace("/", "-")
        return self.root / "metrics" / "scan" / f"{attack}-{slug}.json"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    def report_files(self) -> tuple[Path, Path]:
        return self.root / "report.md", self.root / "report.html"

    def sweep_temps(self, *folders: Path) -> int:
        """Remove the temporary files a killed write left in ``folders`` (``.<name>.*.tmp``, made by
        :func:`smoothpurify.checkpoint.atomic_write`); the stage that owns a folder calls this before
        writing into it. Returns how many were removed."""
        removed = 0
        for folder in folders:
            for tmp in Path(folder).glob(".*.tmp") if Path(folder).is_dir() else ():
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- what several stages read
    def data_meta(self) -> dict[str, Any]:
        return self.modality.data_meta(self.data_dir)

    def load_trigger(self, attack: str) -> Attack:
        """The attack exactly as its model was trained with it (trigger from the model folder)."""
        return self.modality.load_attack(self.model_dir(attack), self.data_meta())

    def read_json(self, path: Path) -> dict[str, Any] | None:
        """A record of this run, or None when absent or unreadable (a report shows what exists)."""
        try:
            return json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            return None


def as_run(run: Run | str, params: dict[str, Any] | None = None) -> Run:
    """Stages take a :class:`Run`, or (for Prefect tasks, DVC and tests) a modality name and params."""
    if isinstance(run, Run):
        return run
    if params is None:
        raise TypeError("a modality name needs its params")
    return Run(run, params)
