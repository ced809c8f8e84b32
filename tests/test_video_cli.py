"""`smoothpurify poison` and `smoothpurify purify --modality video` on a user's UCF-101-layout
folders, end to end on the conformance suite's tiny run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modalities.testing import build

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    d = tmp_path_factory.mktemp("video-user")
    built = build("video", d / "run")
    mod = built.modality
    for split, folder in (("val", "clean"), ("test", "test")):
        x, y = mod.load_split(built.data_dir, split)
        mod.save_user_data(d / folder, x, y)
    meta = mod.data_meta(built.data_dir)
    (built.model_dir(built.attack) / "model.json").write_text(
        json.dumps({"num_classes": meta["num_classes"], "input_shape": meta["input_shape"]}))
    return d, built


def test_poison_then_purify_a_users_video_checkpoint(user):
    d, built = user
    trigger = str(built.model_dir(built.attack))
    out = cli("poison", "--modality", "video", "--trigger", trigger, "--data", "test", "--out", "poisoned", cwd=d)
    assert out.returncode == 0, out.stderr
    assert (d / "poisoned" / "ucfTrainTestlist" / "testlist01.txt").is_file() and "--target-label 0" in out.stdout
    assert sorted((d / "poisoned" / "UCF-101" / "Class01").glob("v_Class01_g0*_c*.avi"))
    out = cli("purify", "--modality", "video", "--checkpoint", str(built.model_dir(built.attack) / "model.safetensors"),
              "--model", "cnn_lstm_tiny", "--num-classes", "8", "--clean-data", "clean", "--test-data", "test",
              "--poisoned-data", "poisoned", "--target-label", "0", "--method", "ft", "--epochs", "2",
              "--out", "purified.safetensors", cwd=d)
    assert out.returncode == 0, out.stderr
    assert (d / "purified.safetensors").is_file()
    record = json.loads((d / "purified.record.json").read_text())
    # The poisoned copy read back through the loader still carries the trigger the model learnt.
    assert record["before"]["asr"] > 0.8, record["before"]


def test_bad_video_folder_is_one_error_line(user):
    d, built = user
    out = cli("poison", "--modality", "video", "--trigger", str(built.model_dir(built.attack)), "--data",
              "no-such-folder", "--out", "p2", cwd=d)
    assert out.returncode != 0
    assert "error" in out.stderr.lower() and "Traceback" not in out.stderr


def test_report_figure_of_a_clean_and_a_triggered_clip(user, tmp_path):
    _, built = user
    mod = built.modality
    attack = mod.load_attack(built.model_dir(built.attack), mod.data_meta(built.data_dir))
    png, caption = mod.trigger_figure(built.data_dir, attack, tmp_path / "trigger.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "triggered" in caption or "trigger" in caption
