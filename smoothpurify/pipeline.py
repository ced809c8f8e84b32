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

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import write_json
from smoothpurify.modality import get_modality
from smoothpurify.params import fingerprint

BENIGN = "benign"


def run_root(params: dict[str, Any], modality: str) -> Path:
    return Path(params.get("run_dir", "runs")) / modality


def _stage_params(params: dict[str, Any], modality: str, attack: str) -> Any:
    """What training ``attack``'s model depends on: the modality says, if it can (so adding an
    attack to the list does not retrain the others); else its whole params section."""
    narrow = getattr(get_modality(modality), "training_params", None)
    section = narrow(params, attack) if narrow is not None else params.get(modality, {})
    return {"seed": params.get("seed", 0), modality: section}


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
    fp = fingerprint(_stage_params(params, modality, attack), attack, (root / "data" / "data.json").read_text()
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


def method_overrides(params: dict[str, Any], method: str) -> dict[str, Any]:
    """params.yaml's ``purify.common`` then ``purify.overrides.<method>``."""
    section = params.get("purify", {}) or {}
    return {**(section.get("common") or {}), **((section.get("overrides") or {}).get(method) or {})}


def check_names(modality: str, params: dict[str, Any], attacks: list[str], methods: list[str]) -> None:
    """Fail before any work on an unknown attack or method, or a method setting that is invalid."""
    known = get_modality(modality).attack_names(params)
    unknown = [a for a in attacks if a not in known]
    if unknown:
        raise SmoothPurifyError(f"unknown attack {unknown[0]!r}; choose one of: {', '.join(known)}")
    for method in methods:
        method_runner(params, method)


def method_runner(params: dict[str, Any], method: str):
    """``(settings, run)`` for ``method`` with params.yaml's settings.

    Tuning-loop presets get ``purify.common`` then ``purify.overrides.<method>``; baseline defenses
    have their own settings, so only ``purify.overrides.<method>`` applies to them.
    """
    from smoothpurify.methods import PRESETS, make_runner

    section = params.get("purify", {}) or {}
    own = ((section.get("overrides") or {}).get(method)) or {}
    return make_runner(method, method_overrides(params, method) if method in PRESETS else own)


def purify(modality: str, params: dict[str, Any], attack: str, method: str, force: bool = False,
           progress: bool = True) -> dict[str, Any]:
    """Purify the ``attack`` model with ``method`` on the clean validation split; evaluate before/after.

    Writes ``purified/<attack>/<method>/model.safetensors`` (original architecture) and
    ``metrics/purify/<attack>-<method>.json``. The test-set evaluation is reporting only.
    """
    from smoothpurify.checkpoint import save_checkpoint

    root = run_root(params, modality)
    settings, run_method = method_runner(params, method)
    out = root / "purified" / attack / method
    metrics_path = root / "metrics" / "purify" / f"{attack}-{method}.json"
    model_meta = root / "models" / attack / "model.json"
    curve_every = int((params.get("purify", {}) or {}).get("curve_every") or 0)
    fp = fingerprint(settings, params.get("seed", 0), curve_every,
                     (params.get("analysis") or {}).get("curve_lambda_steps"),
                     model_meta.read_text() if model_meta.is_file() else None)
    if not force and _fresh(metrics_path, fp) and (out / "model.safetensors").is_file():
        return json.loads(metrics_path.read_text())
    mod = get_modality(modality)
    data_dir = root / "data"
    trigger = mod.load_attack(root / "models" / attack, mod.data_meta(data_dir))
    model, meta = mod.load_model(root / "models" / attack)
    device = params.get(modality, {}).get("device", "cpu")
    x, y = mod.load_split(data_dir, "val")

    def evaluate_on_test(m):
        return mod.evaluate(m.to(device), data_dir, trigger, device=device)

    from smoothpurify.curves import with_lambda_max, write_curves_csv

    before = evaluate_on_test(model)
    evaluate_curve = (with_lambda_max(evaluate_on_test, modality, params, attack, mod.likelihood)
                      if curve_every else evaluate_on_test)
    result = run_method(model, x, y, mod.likelihood, seed=int(params.get("seed", 0)), device=device,
                        evaluate=evaluate_curve, eval_every=curve_every or None, progress=progress,
                        augment=mod.augment)
    save_checkpoint(out / "model.safetensors", result.model.cpu(),
                    {**{k: v for k, v in meta.items() if k != "fingerprint"}, "purified_by": method,
                     "purify_config": settings})
    record = {"attack": attack, "method": method, "before": before, "after": result.record.pop("metrics"),
              **result.record, "fingerprint": fp}
    write_json(metrics_path, record)
    # Always written (header only without curves): DVC needs the declared plot file to exist.
    write_curves_csv(record, root / "curves" / f"{attack}-{method}.csv")
    return record
