"""Pipeline stages as plain functions over a run folder; Prefect tasks, DVC and the CLI call these.

Layout of ``runs/<modality>/``::

    data/            train/val/test splits + data.json          (prepare)
    models/<name>/   model.safetensors(+.json), trigger.*       (train_attack; name "benign" or an attack)
    metrics/<name>.json                                          (evaluate)

Stages reach modalities only through the registry (:func:`smoothpurify.modality.get_modality`).
A stage whose outputs exist with the same fingerprint (its parameters) is skipped, so an
interrupted flow resumes from its last finished stage.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smoothpurify.checkpoint import write_json
from smoothpurify.modality import get_modality
from smoothpurify.params import fingerprint

BENIGN = "benign"


def run_root(params: dict[str, Any], modality: str) -> Path:
    return Path(params.get("run_dir", "runs")) / modality


def _stage_params(params: dict[str, Any], modality: str) -> dict[str, Any]:
    return {"seed": params.get("seed", 0), modality: params.get(modality, {})}


def _fresh(record: Path, fp: str) -> bool:
    if not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("fingerprint") == fp
    except json.JSONDecodeError:
        return False


def prepare(modality: str, params: dict[str, Any], force: bool = False) -> dict[str, Any]:
    root = run_root(params, modality) / "data"
    mod = get_modality(modality)
    section = dict(params.get(modality, {}))
    # Only what shapes the data decides whether it must be rebuilt.
    data_keys = {k: section.get(k) for k in ("dataset", "data_path", "image_size", "val_fraction", "max_train", "max_test")}
    fp = fingerprint(params.get("seed", 0), data_keys)
    if not force and _fresh(root / "data.json", fp):
        return json.loads((root / "data.json").read_text())
    meta = mod.prepare_data(params, root)
    meta["fingerprint"] = fp
    write_json(root / "data.json", meta)
    return meta


def train_attack(modality: str, params: dict[str, Any], attack: str, force: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Train the benign model (``attack="benign"``) or a model backdoored by ``attack``."""
    root = run_root(params, modality)
    out = root / "models" / attack
    fp = fingerprint(_stage_params(params, modality), attack, (root / "data" / "data.json").read_text()
                     if (root / "data" / "data.json").is_file() else None)
    if not force and _fresh(out / "model.json", fp):
        return json.loads((out / "model.json").read_text())
    mod = get_modality(modality)
    meta = mod.train_model(params, root / "data", None if attack == BENIGN else attack, out, progress=progress)
    meta["fingerprint"] = fp
    write_json(out / "model.json", meta)
    return meta


def evaluate(modality: str, params: dict[str, Any], attack: str) -> dict[str, Any]:
    """Metrics of the benign and the ``attack`` model, both under ``attack``'s trigger."""
    root = run_root(params, modality)
    mod = get_modality(modality)
    data_meta = mod.data_meta(root / "data")
    trigger = mod.load_attack(root / "models" / attack, data_meta)
    device = params.get(modality, {}).get("device", "cpu")
    record: dict[str, Any] = {"attack": attack, "data_source": data_meta["source"]}
    for name in (BENIGN, attack):
        model_dir = root / "models" / name
        if not (model_dir / "model.safetensors").is_file():
            continue
        model, _ = mod.load_model(model_dir)
        key = "benign" if name == BENIGN else "backdoored"
        record[key] = mod.evaluate(model.to(device), root / "data", trigger, device=device)
    write_json(root / "metrics" / f"{attack}.json", record)
    return record
