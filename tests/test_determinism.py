"""The same seed twice gives byte-identical checkpoints and the same metrics (timings apart); a
retrain that reproduces the same bytes re-runs no purification (fingerprints of content)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pipeline

TIMINGS = {"seconds", "train_seconds", "wall_seconds"}


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _run(params: dict) -> Path:
    params["purify"]["common"]["epochs"] = 1
    pipeline.prepare("image", params)
    pipeline.train_attack("image", params, "badnets", progress=False)
    pipeline.purify("image", params, "badnets", "ft", progress=False)
    return pipeline.Run("image", params).root


def test_same_seed_same_bytes_and_metrics(tiny_params, tmp_path):
    other = copy.deepcopy(tiny_params)
    other["run_dir"] = str(tmp_path / "second")
    first, second = _run(tiny_params), _run(other)
    for rel in ("models/badnets/model.safetensors", "models/badnets/trigger.safetensors",
                "purified/badnets/ft/model.safetensors"):
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    rec = [_without_timings(json.loads((root / "metrics/purify/badnets-ft.json").read_text())) for root in (first, second)]
    assert rec[0] == rec[1]


def test_a_byte_identical_retrain_reruns_no_purification(tiny_params):
    root = _run(tiny_params)
    record = root / "metrics/purify/badnets-ft.json"
    stamp = json.loads(record.read_text())["seconds"]
    pipeline.train_attack("image", tiny_params, "badnets", force=True, progress=False)  # new train_seconds
    again = pipeline.purify("image", tiny_params, "badnets", "ft", progress=False)
    assert again["seconds"] == stamp  # read back, not recomputed
