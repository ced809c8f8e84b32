"""`smoothpurify purify` on a checkpoint trained outside the pipeline, and its error lines."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_images

ROOT = Path(__file__).resolve().parents[1]

USER_MODEL = '''
import torch.nn as nn

def build(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, num_classes))
'''


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "purify", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def outside_checkpoint(tmp_path):
    """A user's own model file, a checkpoint trained here by hand, and clean / test data as .npz."""
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    x, y = tiny_images(300, 0)
    np.savez(tmp_path / "clean.npz", x=x[:100], y=y[:100])
    np.savez(tmp_path / "test.npz", x=x[100:], y=y[100:])
    torch.manual_seed(0)
    import importlib.util
    spec = importlib.util.spec_from_file_location("mymodel", tmp_path / "mymodel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xt, yt = torch.from_numpy(x[100:]).float() / 255, torch.from_numpy(y[100:])
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_purify_own_checkpoint(outside_checkpoint):
    d = outside_checkpoint
    out = run_cli("--checkpoint", "model.safetensors", "--model", "mymodel.py:build", "--num-classes", "10",
                  "--clean-data", "clean.npz", "--test-data", "test.npz", "--method", "ngf", "--epochs", "3",
                  "--out", "purified.safetensors", cwd=d)
    assert out.returncode == 0, out.stderr
    assert (d / "purified.safetensors").is_file() and (d / "purified.record.json").is_file()
    assert "before" in out.stdout and "after" in out.stdout
    import json
    record = json.loads((d / "purified.record.json").read_text())
    assert record["classifier"] == "3" and record["after"]["acc"] > 0.5


@pytest.mark.parametrize("args,msg", [
    (["--checkpoint", "evil.safetensors"], "refusing to unpickle"),
    (["--checkpoint", "missing.safetensors"], "checkpoint not found"),
    (["--num-classes", "5"], "labels 0..9 but --num-classes is 5"),
    (["--model", "mymodel.py"], "name the factory function"),
    (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["--method", "magic"], "unknown purification method 'magic'"),
    (["--clean-data", "nowhere"], "data path not found"),
    (["--normalize", "abc"], "--normalize"),
    (["--precision", "half"], "--precision 'half': choose auto, fp32 or bf16"),
])
def test_clear_one_line_errors(outside_checkpoint, args, msg):
    d = outside_checkpoint
    (d / "evil.safetensors").write_bytes(pickle.dumps({"a": 1}))
    base = {"--checkpoint": "model.safetensors", "--model": "mymodel.py:build", "--num-classes": "10",
            "--clean-data": "clean.npz", "--method": "ngf"}
    base.update(dict(zip(args[::2], args[1::2])))
    out = run_cli(*[t for kv in base.items() for t in kv], "--epochs", "1", cwd=d)
    assert out.returncode == 2, out.stdout + out.stderr
    assert msg in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not (d / "purified.safetensors").exists()


def test_without_method_the_recommended_method_runs(outside_checkpoint):
    d = outside_checkpoint
    out = run_cli("--checkpoint", "model.safetensors", "--model", "mymodel.py:build", "--num-classes", "10",
                  "--clean-data", "clean.npz", "--epochs", "30", "--lr", "0.05", "--no-augment",
                  "--out", "purified.safetensors", cwd=d)
    # A fresh classifier needs more than two steps (fewer collapse and are refused), and a tiny
    # image's class is its bar's row, which a shift changes: hence the options.
    assert out.returncode == 0, out.stderr
    import json
    record = json.loads((d / "purified.record.json").read_text())
    assert record["method"] == "recommended" and record["recommended"] is True
    assert record["config"]["reinit_classifier"] and "val_acc_end" in record
    assert "recommended (=" in out.stdout and "fst-kd-overlay-light" in out.stdout and "clean val. ACC %" in out.stdout
    assert "clean validation accuracy only" in out.stdout  # and the table is there even without test data
    before = next(line for line in out.stdout.splitlines() if line.startswith("│ before"))
    assert f"{100 * record['val_acc_start']:.2f}" in before
