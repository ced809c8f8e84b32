"""`smoothpurify poison`: a poisoned copy of a user's data from a saved trigger, then `purify` measures
ASR on it: the README's own-checkpoint example, end to end on tiny data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from smoothpurify.checkpoint import save_checkpoint
from tests.conftest import tiny_images

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    """A BadNets trigger saved the way the pipeline saves it, and a small MLP trained on its poison."""
    from modalities.image import ImageModality

    d = tmp_path_factory.mktemp("poison")
    mod = ImageModality()
    meta = {"num_classes": 10, "input_shape": [1, 12, 12]}
    attack = mod.create_attack("badnets", {"image": {"attack": {"target_label": 0, "poison_rate": 0.2}}}, meta)
    (d / "badnets").mkdir()
    save_checkpoint(d / "badnets" / "trigger.safetensors", attack.state_dict(), attack.describe())
    (d / "badnets" / "model.json").write_text(json.dumps({"architecture": "user", **meta}))
    x, y = tiny_images(1200, 0)
    np.savez(d / "clean.npz", x=x[:200], y=y[:200])
    np.savez(d / "test.npz", x=x[200:600], y=y[200:600])
    xt, yt, _ = attack.poison_training_set(torch.from_numpy(x[600:]).float() / 255, torch.from_numpy(y[600:]))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "mymodel.py").write_text("import torch.nn as nn\n\ndef build(num_classes=10):\n    return nn.Sequential("
                                  "nn.Flatten(), nn.Linear(144, 64), nn.ReLU(), nn.Linear(64, num_classes))\n")
    return d, attack


def test_poison_writes_the_triggered_copy_with_true_labels(backdoored):
    d, attack = backdoored
    out = cli("poison", "--trigger", "badnets", "--data", "test.npz", "--out", "poisoned.npz", cwd=d)
    assert out.returncode == 0, out.stderr
    assert "--target-label 0" in out.stdout
    clean, poisoned = np.load(d / "test.npz"), np.load(d / "poisoned.npz")
    keep = clean["y"] != 0  # inputs already of the target class cannot show a backdoor
    assert len(poisoned["y"]) == keep.sum() and (poisoned["y"] == clean["y"][keep]).all()
    expected = (attack.apply(torch.from_numpy(clean["x"][keep]).float() / 255) * 255).round().to(torch.uint8)
    assert np.array_equal(poisoned["x"], expected.numpy())
    assert not np.array_equal(poisoned["x"], clean["x"][keep])


def test_purify_reports_asr_on_the_poisoned_copy(backdoored):
    d, _ = backdoored
    assert cli("poison", "--trigger", "badnets", "--data", "test.npz", "--out", "p2.npz", cwd=d).returncode == 0
    out = cli("purify", "--checkpoint", "model.safetensors", "--model", "mymodel.py:build", "--num-classes", "10",
              "--clean-data", "clean.npz", "--test-data", "test.npz", "--poisoned-data", "p2.npz",
              "--target-label", "0", "--method", "ft", "--epochs", "2", "--no-augment", "--out", "pur.safetensors",
              cwd=d)
    assert out.returncode == 0, out.stderr
    record = json.loads((d / "pur.record.json").read_text())
    assert record["before"]["asr"] > 0.8  # the trigger made by `poison` really fires the backdoor
    assert "ASR %" in out.stdout and "clean val. ACC %" in out.stdout


@pytest.mark.parametrize("args, message", [
    (("--trigger", "nowhere", "--data", "test.npz", "--out", "x.npz"), "no trigger in nowhere"),
    (("--trigger", "badnets", "--data", "test.npz", "--out", "test.npz"), "is the clean data itself"),
    (("--trigger", "badnets", "--data", "test.npz", "--out", "x.png"), "name the file *.npz"),
    (("--trigger", "badnets", "--data", "missing.npz", "--out", "x.npz"), "missing.npz"),
])
def test_poison_refuses_bad_requests_in_one_line(backdoored, args, message):
    d, _ = backdoored
    out = cli("poison", *args, cwd=d)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (d / "x.npz").exists() and not (d / "x.png").exists()
