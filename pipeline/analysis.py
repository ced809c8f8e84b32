"""The smoothness-analysis stage: each attack's fixed batch on disk, and one model's analysis record.

The batch (SFT appendix A.2.2) is drawn once per attack and saved, so the benign, backdoored and
every purified model are measured on exactly the same samples; the estimators are
:mod:`smoothpurify.smoothness`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import load_meta, load_state, save_checkpoint, write_json
from smoothpurify.smoothness import RUNTIME_KEYS, analysis_settings, analyze_model, build_analysis_batch, density_from_record
from smoothpurify.training import num_samples, to_device
from pipeline.params import file_hash, fingerprint
from pipeline.run import BACKDOORED, BENIGN, Run

__all__ = ["analysis_batch", "analyze_stage", "BACKDOORED", "BENIGN"]


def _text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _save_batch(path: Path, inputs: Any, targets: torch.Tensor, mask: torch.Tensor, meta: dict[str, Any]) -> None:
    tensors = ({f"inputs.{i}": t for i, t in enumerate(inputs)} if isinstance(inputs, (tuple, list))
               else {"inputs": inputs})
    save_checkpoint(path, {**tensors, "targets": targets, "poisoned": mask}, meta)


def _load_batch(path: Path) -> tuple[Any, torch.Tensor, torch.Tensor]:
    state = load_state(path)
    if "inputs" in state:
        inputs: Any = state["inputs"]
    else:
        inputs = tuple(state[f"inputs.{i}"] for i in range(sum(k.startswith("inputs.") for k in state)))
    return inputs, state["targets"], state["poisoned"].bool()


def analysis_batch(modality: str, params: dict[str, Any], attack: str,
                   force: bool = False) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The attack's fixed analysis batch, built from the test split on first use and then reused.

    Saved to ``runs/<m>/analysis/<attack>/batch.safetensors``; rebuilt only when the data, the
    trigger or the batch settings change (fingerprint in the sidecar).
    """
    s = analysis_settings(params.get("analysis"))
    run = Run(modality, params)
    path, seed = run.analysis_batch(attack), run.seed
    fp = fingerprint(s.n_clean, s.n_poison, seed, _text(run.data_json), _text(run.trigger_json(attack)))
    if not force and path.is_file() and load_meta(path).get("fingerprint") == fp:
        return _load_batch(path)
    trigger = run.load_trigger(attack)
    x, y = run.modality.load_split(run.data_dir, "test")
    xp, yp_true, _ = trigger.poisoned_test_set(x, y)
    inputs, targets, mask = build_analysis_batch(x, y, xp, yp_true, s.n_clean, s.n_poison, seed,
                                                 pad_value=getattr(run.modality, "pad_value", None))
    _save_batch(path, inputs, targets, mask, {"fingerprint": fp, "attack": attack, "split": "test",
                                              "n_clean": s.n_clean, "n_poison": s.n_poison, "seed": seed})
    return inputs, targets, mask


def analyze_stage(modality: str, params: dict[str, Any], attack: str, model_name: str,
                  force: bool = False) -> dict[str, Any]:
    """Analyse one model on ``attack``'s fixed batch and return the full record.

    ``model_name``: ``benign``, ``backdoored`` (or the attack's name) or ``purified/<method>``.
    Writes ``metrics/analysis/<attack>-{benign,backdoored,purified-<method>}.json`` (density left
    out: it is recomputed from the stored SLQ nodes).

    Skipped when the model file, the batch and the settings are unchanged.
    """
    s = analysis_settings(params.get("analysis"))
    run = Run(modality, params)
    model_name = attack if model_name == BACKDOORED else model_name
    mdir = run.analysed_model_dir(attack, model_name)
    weights = mdir / "model.safetensors"
    if not weights.is_file():
        stage = "purify" if model_name.startswith("purified/") else "attack"
        raise SmoothPurifyError(f"no model at {weights}; run the {stage} stage for {model_name!r} first")
    inputs, targets, mask = analysis_batch(modality, params, attack)
    out = run.analysis_record(attack, model_name)
    batch_fp = load_meta(run.analysis_batch(attack)).get("fingerprint")
    fp = fingerprint(s.model_dump(exclude=set(RUNTIME_KEYS)), run.seed, batch_fp,
                     file_hash(weights))
    if not force and out.is_file():
        try:
            old = json.loads(out.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("fingerprint") == fp:
            return {**old, "density": density_from_record(old)}
    mod, device = run.modality, run.device
    model = mod.load_model(mdir)[0].to(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads or threads)
    try:
        result = analyze_model(model, to_device(inputs, device), targets.to(device), mod.likelihood, s,
                               seed=run.seed, poisoned=mask)
    finally:
        torch.set_num_threads(threads)
    record = {"modality": modality, "attack": attack, "model": model_name,
              "batch": {"path": str(run.analysis_batch(attack)),
                        "n_clean": int((~mask).sum()), "n_poison": int(mask.sum()), "size": num_samples(inputs)},
              **{k: v for k, v in result.items() if k != "density"}, "fingerprint": fp}
    write_json(out, record)
    return {**record, "density": result["density"]}
