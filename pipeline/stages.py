"""Pipeline stages as plain functions of ``(modality, params)``; Prefect tasks, DVC and the CLI call these.

Paths come from :class:`pipeline.run.Run`; modalities are reached only through the registry
(:func:`modalities.contract.get_modality`), never imported. A stage whose outputs exist with the
same fingerprint (its parameters) is skipped, so an interrupted flow resumes from its last
finished stage.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from smoothpurify import NonFiniteLoss, SmoothPurifyError
from smoothpurify.checkpoint import save_checkpoint, write_json
from smoothpurify.methods import PRESETS
from smoothpurify.purify import PurifyResult
from smoothpurify.runner import make_runner
from pipeline.params import file_hash, fingerprint
from modalities.contract import get_modality, method_defaults, unlearn_families
from pipeline.run import BENIGN, Run

__all__ = ["BENIGN", "prepare", "train_attack", "evaluate", "purify", "method_runner", "method_overrides",
           "check_names", "run_root"]


def run_root(params: dict[str, Any], modality: str) -> Path:
    return Run(modality, params).root


def _fresh(record: Path, fp: str) -> bool:
    if not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("fingerprint") == fp
    except json.JSONDecodeError:
        return False


def prepare(modality: str, params: dict[str, Any], force: bool = False) -> dict[str, Any]:
    run = Run(modality, params)
    # Only what shapes the data decides whether it must be rebuilt (the modality says what that is).
    fp = fingerprint(run.seed, run.modality.data_params(params))
    if not force and _fresh(run.data_json, fp):
        return json.loads(run.data_json.read_text())
    run.sweep_temps(run.data_dir)
    meta = run.modality.prepare_data(params, run.data_dir)
    meta["fingerprint"] = fp
    write_json(run.data_json, meta)
    return meta


def train_attack(modality: str, params: dict[str, Any], attack: str, force: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Train the benign model (``attack="benign"``) or a model backdoored by ``attack``."""
    run = Run(modality, params)
    record = run.model_json(attack)
    stage_params = {"seed": run.seed, modality: run.modality.training_params(params, attack)}
    fp = fingerprint(stage_params, attack, run.data_json.read_text() if run.data_json.is_file() else None)
    if not force and _fresh(record, fp):
        return json.loads(record.read_text())
    run.sweep_temps(run.model_dir(attack))
    meta = run.modality.train_model(params, run.data_dir, None if attack == BENIGN else attack, run.model_dir(attack),
                                    progress=progress)
    meta["fingerprint"] = fp
    write_json(record, meta)
    return meta


def evaluate(modality: str, params: dict[str, Any], attack: str) -> dict[str, Any]:
    """Metrics of the benign and the ``attack`` model, both under ``attack``'s trigger."""
    run = Run(modality, params)
    trigger = run.load_trigger(attack)
    record: dict[str, Any] = {"attack": attack, "data_source": run.data_meta()["source"]}
    for name in (BENIGN, attack):
        if not (run.model_dir(name) / "model.safetensors").is_file():
            continue
        model, meta = run.modality.load_model(run.model_dir(name))
        key = "benign" if name == BENIGN else "backdoored"
        record[key] = run.modality.evaluate(model.to(run.device), run.data_dir, trigger, device=run.device)
        record[f"{key}_model"] = _model_fingerprint(run, name)
    write_json(run.attack_metrics(attack), record)
    for key in ("benign", "backdoored"):
        run.write_cell(attack, key, record.get(key))
    return record


def _model_fingerprint(run: Run, name: str) -> str | None:
    return (run.read_json(run.model_json(name)) or {}).get("fingerprint")


def _backdoored_metrics(run: Run, attack: str) -> dict[str, float] | None:
    """The evaluate stage's metrics of this very model (same fingerprint), so that every method's
    "before" is not recomputed; None when that record is missing or about another model."""
    rec = run.read_json(run.attack_metrics(attack)) or {}
    fp = _model_fingerprint(run, attack)
    return rec.get("backdoored") if fp is not None and rec.get("backdoored_model") == fp else None


def method_overrides(params: dict[str, Any], method: str, modality: str | None = None) -> dict[str, Any]:
    """The modality's own settings of the preset (``method_defaults``), then params.yaml's
    ``purify.common`` (unless ``purify.common_skips`` lists the preset), then ``purify.overrides.<method>``.

    ``common_skips`` exists for a preset with its own schedule (``recommended``: the preset's 100 epochs,
    or its modality's own, video's 150) that a profile's blanket ``common`` (the smoke profile's 20 epochs
    for the papers' presets) must not shorten."""
    section = params.get("purify", {}) or {}
    skips = section.get("common_skips") or []
    if not isinstance(skips, list) or not all(isinstance(s, str) for s in skips):
        raise SmoothPurifyError(f"params.yaml purify.common_skips: a list of preset names, got {skips!r}")
    unknown = [s for s in skips if s not in PRESETS]
    if unknown:
        raise SmoothPurifyError(f"params.yaml purify.common_skips: unknown preset {unknown[0]!r}; choose among: "
                                f"{', '.join(PRESETS)}")
    own = method_defaults(get_modality(modality), method) if modality else {}
    common = {} if method in skips else (section.get("common") or {})
    return {**own, **common, **((section.get("overrides") or {}).get(method) or {})}


def check_names(modality: str, params: dict[str, Any], attacks: list[str], methods: list[str]) -> None:
    """Fail before any work on an unknown attack or method, or a method setting that is invalid."""
    known = Run(modality, params).modality.attack_names(params)
    unknown = [a for a in attacks if a not in known]
    if unknown:
        raise SmoothPurifyError(f"unknown attack {unknown[0]!r}; choose one of: {', '.join(known)}")
    for method in methods:
        method_runner(params, method, modality)


def method_runner(params: dict[str, Any], method: str, modality: str | None = None):
    """``(settings, run)`` for ``method`` with params.yaml's settings.

    Tuning-loop presets get ``purify.common`` then ``purify.overrides.<method>``; baseline defenses
    have their own settings, so only ``purify.overrides.<method>`` applies to them. ``purify.precision``
    (auto | fp32 | bf16, default auto) picks the device's speed-ups (smoothpurify.accel).
    """
    section = params.get("purify", {}) or {}
    own = ((section.get("overrides") or {}).get(method)) or {}
    return make_runner(method, method_overrides(params, method, modality) if method in PRESETS else own,
                       precision=section.get("precision") or "auto")


def _blown_up(model: Any, method: str, settings: dict[str, Any], err: NonFiniteLoss, evaluate: Any) -> PurifyResult:
    """One cell's loss became NaN: the model as received stands for its result, marked diverged (so
    it is never called best, and says why), and the other cells still run."""
    warnings.warn(f"{method}: {err}; recorded as diverged, the model kept as received", RuntimeWarning, stacklevel=3)
    return PurifyResult(model, {"method": method, "config": settings, "diverged": True,
                                "diverged_reason": f"loss became non-finite ({err})", "metrics": evaluate(model)})


def purify(modality: str, params: dict[str, Any], attack: str, method: str, force: bool = False,
           progress: bool = True) -> dict[str, Any]:
    """Purify the ``attack`` model with ``method`` on the clean validation split; evaluate before/after.

    Writes the purified model (original architecture) and its record (:class:`Run` names both).
    The test-set evaluation is reporting only.
    """
    from pipeline.curves import with_lambda_max, write_curves_csv  # noqa: PLC0415 - only this stage draws curves

    run = Run(modality, params)
    mod = run.modality
    settings, run_method = method_runner(params, method, modality)
    out, metrics_path = run.purified_dir(attack, method), run.purify_metrics(attack, method)
    curve_every = int((params.get("purify", {}) or {}).get("curve_every") or 0)
    # Content, not timings: a retrain that gives byte-identical weights re-runs nothing.
    fp = fingerprint(settings, run.seed, curve_every, (params.get("analysis") or {}).get("curve_lambda_steps"),
                     file_hash(run.model_dir(attack) / "model.safetensors"),
                     file_hash(run.model_dir(attack) / "trigger.safetensors"), file_hash(run.data_json))
    if not force and _fresh(metrics_path, fp) and (out / "model.safetensors").is_file():
        record = json.loads(metrics_path.read_text())
        if not run.cell_metrics(attack, method).is_file():
            run.write_cell(attack, method, record.get("after"))
        return record
    run.sweep_temps(out, metrics_path.parent, run.curves_csv(attack, method).parent)
    trigger = run.load_trigger(attack)
    model, meta = mod.load_model(run.model_dir(attack))
    x, y = mod.load_split(run.data_dir, "val")

    def evaluate_on_test(m):
        return mod.evaluate(m.to(run.device), run.data_dir, trigger, device=run.device)

    before = _backdoored_metrics(run, attack) or evaluate_on_test(model)
    evaluate_curve = with_lambda_max(evaluate_on_test, run, attack) if curve_every else evaluate_on_test
    try:
        result = run_method(model, x, y, mod.likelihood, seed=run.seed, device=run.device, evaluate=evaluate_curve,
                            eval_every=curve_every or None, progress=progress, augment=mod.augment,
                            overlay=getattr(mod, "overlay", None), unlearn_families=unlearn_families(mod))
    except NonFiniteLoss as err:
        result = _blown_up(model, method, settings, err, evaluate_on_test)
    save_checkpoint(out / "model.safetensors", result.model.cpu(),
                    {**{k: v for k, v in meta.items() if k != "fingerprint"}, "purified_by": method,
                     "purify_config": settings})
    record = {"attack": attack, "method": method, "before": before, "after": result.record.pop("metrics"),
              **result.record, "fingerprint": fp}
    write_json(metrics_path, record)
    run.write_cell(attack, method, record["after"])
    # Always written (header only without curves): DVC needs the declared plot file to exist.
    write_curves_csv(record, run.curves_csv(attack, method))
    return record
