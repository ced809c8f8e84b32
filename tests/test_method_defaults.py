"""A modality's own preset settings (``method_defaults``): under params.yaml and the command line."""
from __future__ import annotations

import pytest

from smoothpurify import SmoothPurifyError

from modalities.contract import get_modality, method_defaults
from pipeline.stages import method_runner


def _settings(params, method, modality):
    settings, _ = method_runner(params, method, modality)
    return settings if isinstance(settings, dict) else settings.model_dump()


def test_translation_clips_every_tuning_preset_and_params_still_win():
    params = {"purify": {"common": {"epochs": 3}}}
    assert _settings(params, "recommended", "translation")["max_grad_norm"] == 10.0
    assert _settings(params, "ft-init", "translation")["max_grad_norm"] == 10.0
    assert _settings(params, "ft-sam", "translation")["max_grad_norm"] == 10.0
    assert _settings(params, "recommended", "image")["max_grad_norm"] is None     # other modalities untouched
    assert _settings(params, "recommended", None)["max_grad_norm"] is None        # no modality: the preset
    params["purify"]["overrides"] = {"recommended": {"max_grad_norm": 3.0}}
    assert _settings(params, "recommended", "translation")["max_grad_norm"] == 3.0
    assert _settings(params, "recommended", "translation")["epochs"] == 3


def test_each_modality_s_own_recommended_setting():
    own = _settings({}, "recommended", "translation")
    assert (own["reinit_classifier"], own["distill_weight"], own["feature_shift_weight"], own["lr"]) == (False, 0.0, 0.0, 0.01)
    video = _settings({}, "recommended", "video")
    assert (video["distill_weight"], video["batch_size"], video["epochs"], video["lr_step"]) == (10.0, 32, 150, 60)
    image = _settings({}, "recommended", "image")
    assert (image["batch_size"], image["feature_shift_weight"]) == (32, 2.5)
    assert _settings({}, "recommended", "video")["feature_shift_weight"] == 2.0   # the preset's, not the image one
    assert _settings({}, "recommended", None)["batch_size"] == 128                 # the preset itself
    light = _settings({}, "fst-kd-overlay-light", "image")
    assert (light["batch_size"], light["feature_shift_weight"]) == (128, 2.0)     # only `recommended` moved
    multilabel = _settings({}, "recommended", "multilabel")
    assert (multilabel["feature_shift_weight"], multilabel["distill_weight"], multilabel["overlay_max"]) == (1.0, 1.0, 0.0)
    assert multilabel["epochs"] == 100
    image = _settings({}, "recommended", "image")
    assert image["reinit_classifier"] and image["distill_weight"] > 0 and image["feature_shift_weight"] > 0


def test_a_modality_without_defaults_gives_none():
    assert method_defaults(get_modality("image"), "fst-kd") == {}
    assert method_defaults(object(), "recommended") == {}


def test_common_skips_leaves_a_preset_its_own_schedule():
    params = {"purify": {"common": {"epochs": 20, "lr_step": 8}, "common_skips": ["recommended"]}}
    assert (_settings(params, "recommended", "video")["epochs"], _settings(params, "recommended", "video")["lr_step"]) == (150, 60)
    assert _settings(params, "recommended", "image")["epochs"] == 100          # the preset's own
    assert _settings(params, "ft", "video")["epochs"] == 20                    # the others still get `common`
    params["purify"]["overrides"] = {"recommended": {"epochs": 7}}
    assert _settings(params, "recommended", "video")["epochs"] == 7            # an override still wins
    del params["purify"]["common_skips"]
    assert _settings({"purify": {"common": {"epochs": 20}}}, "recommended", "video")["epochs"] == 20


def test_the_smoke_profile_gives_video_its_150_epochs_and_the_others_100():
    from pathlib import Path

    from pipeline.params import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", "smoke")
    assert _settings(params, "recommended", "video")["epochs"] == 150
    assert {_settings(params, "recommended", m)["epochs"] for m in ("image", "multilabel", "pointcloud", "translation")} == {100}
    assert _settings(params, "fsft", "video")["epochs"] == 20


@pytest.mark.parametrize("skips", ["recommended", ["no-such-preset"], [3]])
def test_a_bad_common_skips_is_one_clear_error(skips):
    with pytest.raises(SmoothPurifyError, match="common_skips"):
        _settings({"purify": {"common_skips": skips}}, "recommended", "image")
