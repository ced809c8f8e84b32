"""The real stages end to end on tiny data: the attack works, the benign model does not obey it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from smoothpurify import SmoothPurifyError
import pipeline


def test_prepare_train_evaluate(tiny_params):
    data = pipeline.prepare("image", tiny_params)
    assert data["sizes"]["val"] == 80 and data["sizes"]["train"] == 1420 and data["source"].startswith("tiny")
    for name in ("benign", "badnets"):
        meta = pipeline.train_attack("image", tiny_params, name, progress=False)
        assert meta["architecture"] == "small_cnn"
    rec = pipeline.evaluate("image", tiny_params, "badnets")
    assert rec["backdoored"]["asr"] >= 0.9, rec
    assert rec["benign"]["asr"] <= 0.3, rec
    assert rec["backdoored"]["acc"] >= rec["benign"]["acc"] - 0.05, rec
    root = Path(tiny_params["run_dir"]) / "image"
    assert json.loads((root / "metrics" / "badnets.json").read_text())["backdoored"]["asr"] == rec["backdoored"]["asr"]
    side = json.loads((root / "models" / "badnets" / "model.json").read_text())
    assert side["attack"]["name"] == "badnets" and side["seed"] == 0 and side["num_classes"] == 10


def test_finished_stages_are_skipped(tiny_params):
    pipeline.prepare("image", tiny_params)
    first = pipeline.train_attack("image", tiny_params, "benign", progress=False)
    again = pipeline.train_attack("image", tiny_params, "benign", progress=False)
    assert again["train_seconds"] == first["train_seconds"]  # read back, not retrained
    # Another attack in the list, another attack's options or a new variant: the benign model stands.
    img = tiny_params["image"]
    img["attacks"] = ["badnets", "blend"]
    img["attack"] = {**img["attack"], "options": {"blend": {"alpha": 0.3}},
                     "variants": {"blend-50": {"attack": "blend", "poison_rate": 0.5}}}
    assert pipeline.train_attack("image", tiny_params, "benign", progress=False)["fingerprint"] == first["fingerprint"]
    mod = pipeline.Run("image", tiny_params).modality
    assert (mod.training_params(tiny_params, "badnets")
            != mod.training_params(tiny_params, "blend")
            != mod.training_params(tiny_params, "blend-50"))
    img["train"] = {**img["train"], "epochs": 1}  # what the model does depend on: retrained
    assert pipeline.train_attack("image", tiny_params, "benign", progress=False)["fingerprint"] != first["fingerprint"]


def test_same_seed_same_metrics(tiny_params, tmp_path):
    pipeline.prepare("image", tiny_params)
    pipeline.train_attack("image", tiny_params, "badnets", progress=False)
    a = pipeline.evaluate("image", tiny_params, "badnets")
    other = dict(tiny_params, run_dir=str(tmp_path / "runs2"))
    pipeline.prepare("image", other)
    pipeline.train_attack("image", other, "badnets", progress=False)
    b = pipeline.evaluate("image", other, "badnets")
    assert a["backdoored"] == b["backdoored"]


@pytest.mark.parametrize("patch,msg", [
    ({"attack": {"poison_rate": 1.5}}, "poison_rate"),
    ({"dataset": "cifar10", "data_path": "/nonexistent/cifar"}, "dataset path not found"),
    ({"dataset": "cifar10"}, "data_path"),
    ({"model": "resnet9"}, "unknown model"),
])
def test_bad_params_fail_with_one_line(tiny_params, patch, msg):
    params = json.loads(json.dumps(tiny_params))
    for k, v in patch.items():
        params["image"][k] = v if not isinstance(v, dict) else {**params["image"].get(k, {}), **v}
    with pytest.raises(SmoothPurifyError, match=msg) as err:
        pipeline.prepare("image", params)
        pipeline.train_attack("image", params, "benign", progress=False)
    assert "\n" not in str(err.value)


def test_target_label_outside_classes(tiny_params):
    tiny_params["image"]["attack"]["target_label"] = 12
    pipeline.prepare("image", tiny_params)
    with pytest.raises(SmoothPurifyError, match="outside the classes"):
        pipeline.train_attack("image", tiny_params, "badnets", progress=False)


def test_purify_reuses_the_evaluate_stage_metrics_of_the_same_model_only(tiny_params):
    tiny_params["purify"]["common"]["epochs"] = 1
    pipeline.prepare("image", tiny_params)
    pipeline.train_attack("image", tiny_params, "badnets", progress=False)
    pipeline.evaluate("image", tiny_params, "badnets")
    path = pipeline.Run("image", tiny_params).attack_metrics("badnets")
    rec = json.loads(path.read_text())
    rec["backdoored"]["asr"] = 0.123  # a sentinel: only a reused record can carry it
    path.write_text(json.dumps(rec))
    assert pipeline.purify("image", tiny_params, "badnets", "ngf", progress=False)["before"]["asr"] == 0.123
    rec["backdoored_model"] = "another model"
    path.write_text(json.dumps(rec))
    assert pipeline.purify("image", tiny_params, "badnets", "ngf", force=True, progress=False)["before"]["asr"] != 0.123


def test_a_cell_whose_loss_blows_up_is_recorded_diverged_and_the_next_cell_runs(tiny_params):
    """A learning rate far too high makes ft's loss NaN: the stage keeps the model as received,
    marks the cell diverged with the reason, writes every output the later stages read, and the
    next method's cell runs as usual."""
    tiny_params["purify"]["overrides"] = {"ft": {"lr": 1e12}}
    pipeline.prepare("image", tiny_params)
    pipeline.train_attack("image", tiny_params, "badnets", progress=False)
    with pytest.warns(RuntimeWarning, match="ft: ft: loss became"):
        rec = pipeline.purify("image", tiny_params, "badnets", "ft", progress=False)
    assert rec["diverged"] and rec["diverged_reason"].startswith("loss became non-finite (ft: loss became")
    assert rec["after"] == rec["before"]  # the model as received, evaluated again
    assert rec["config"]["lr"] == 1e12
    run = pipeline.Run("image", tiny_params)
    assert (run.purified_dir("badnets", "ft") / "model.safetensors").is_file()
    assert run.cell_metrics("badnets", "ft").is_file()
    assert not pipeline.purify("image", tiny_params, "badnets", "ngf", progress=False)["diverged"]
