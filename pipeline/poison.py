"""A poisoned copy of a user's data from a saved trigger (``smoothpurify poison``).

With it, ``smoothpurify purify --poisoned-data`` measures ASR and RA on a checkpoint trained outside
the pipeline: the pipeline saves every attack's trigger next to its model
(``runs/<m>/models/<attack>/trigger.safetensors``), and this applies it to any data the modality
reads. Like the attack's own test set, inputs whose true label already is the attack's target are
left out (they cannot show a backdoor).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import load_meta
from modalities.contract import Modality


def _trigger_meta(trigger_dir: Path) -> dict[str, Any]:
    trigger_dir = Path(trigger_dir)
    if not (trigger_dir / "trigger.safetensors").is_file():
        hint = " (the benign model has none)" if trigger_dir.name == "benign" else ""
        raise SmoothPurifyError(f"no trigger in {trigger_dir}{hint}: expected the folder of a backdoored model "
                                "with trigger.safetensors, e.g. runs/image/models/badnets")
    meta = load_meta(trigger_dir / "model.safetensors")  # its sidecar, model.json
    try:
        return {"num_classes": int(meta["num_classes"]), "input_shape": [int(v) for v in meta["input_shape"]]}
    except (ValueError, KeyError, TypeError):
        raise SmoothPurifyError(f"{trigger_dir / 'model.json'} is missing or lacks num_classes / input_shape; "
                                "it is written next to the trigger by `smoothpurify attack`") from None


def poison_data(modality: Modality, trigger_dir: Path, data: Path, out: Path) -> dict[str, Any]:
    """Apply the trigger saved in ``trigger_dir`` to ``data``; write the poisoned inputs to ``out``.

    Labels written: the true labels for an all-to-one attack (pass its target to ``purify
    --target-label``: ASR and RA), the per-sample targets otherwise (ASR only). Returns a summary
    with ``samples``, ``skipped`` (inputs already of the target class), ``target_label`` (or None)
    and ``labels`` ("true" or "target").
    """
    out, data = Path(out), Path(data)
    if out.resolve() == data.resolve():
        raise SmoothPurifyError(f"--out {out} is the clean data itself; write the poisoned copy elsewhere")
    meta = _trigger_meta(trigger_dir)
    attack = modality.load_attack(Path(trigger_dir), meta)
    x, y = modality.load_user_data(data, None, tuple(meta["input_shape"]))
    if tuple(x.shape[1:]) != tuple(meta["input_shape"]):
        raise SmoothPurifyError(f"{data}: inputs of shape {list(x.shape[1:])}, but the trigger was made for "
                                f"{meta['input_shape']}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= meta["num_classes"]):
        raise SmoothPurifyError(f"{data}: labels outside 0..{meta['num_classes'] - 1}, the model's classes")
    x_poisoned, y_true, y_target = attack.poisoned_test_set(x, y)
    if not len(y_true):
        raise SmoothPurifyError(f"{data}: every input already has the attack's target label; nothing to poison")
    all2one = attack.mapping == "all2one"
    modality.save_user_data(out, x_poisoned, y_true if all2one else y_target)
    return {"attack": attack.name, "samples": int(len(y_true)), "skipped": int(len(y) - len(y_true)),
            "target_label": attack.target_label if all2one else None, "labels": "true" if all2one else "target"}
