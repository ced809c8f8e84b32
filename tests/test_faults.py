"""Fault tests (slow): a small flow stopped at random points resumes to the metrics of an
uninterrupted run, with no temporary file left behind and no process of the stopped run alive."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"seconds", "train_seconds", "wall_seconds"}
pytestmark = pytest.mark.slow


def _params(tmp: Path, name: str) -> Path:
    params = {"profile": "test", "seed": 0, "run_dir": str(tmp / name),
              "image": {"dataset": "synthetic", "val_fraction": 0.05, "model": "small_cnn", "attacks": ["badnets"],
                        "attack": {"target_label": 0, "poison_rate": 0.1},
                        "train": {"epochs": 3, "lr": 0.05, "batch_size": 64}},
              "purify": {"methods": ["ft", "ngf"], "common": {"epochs": 3, "lr_step": 2, "augment": False}},
              "analysis": {"enabled": False}, "profiles": {"test": {}}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _flow(params: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(params.parent / "prefect-home")}
    return subprocess.Popen([sys.executable, "-m", "flows.image", "--params", str(params)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw)


def _metrics(root: Path) -> dict:
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in TIMINGS}
        return [strip(x) for x in v] if isinstance(v, list) else v
    files = sorted((root / "image" / "metrics").rglob("*.json"))
    return {str(f.relative_to(root)): strip(json.loads(f.read_text())) for f in files}


def _finished_stages(root: Path) -> list[str]:
    image = root / "image"
    names = [("data", image / "data" / "data.json"), ("benign", image / "models" / "benign" / "model.json"),
             ("badnets", image / "models" / "badnets" / "model.json"), ("evaluate", image / "metrics" / "badnets.json"),
             ("ft", image / "metrics" / "purify" / "badnets-ft.json"),
             ("ngf", image / "metrics" / "purify" / "badnets-ngf.json")]
    return [name for name, path in names if path.is_file()]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    proc = _flow(_params(tmp, "reference"))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-2000:]
    return tmp, _metrics(tmp / "reference")


# (signal, seed, whom): the whole process group (a terminal, a scheduler) or the flow's process alone
STOPS = [(signal.SIGTERM, 1, "group"), (signal.SIGTERM, 2, "main"), (signal.SIGKILL, 3, "group"),
         (signal.SIGKILL, 4, "main"), (signal.SIGKILL, 5, "main")]


@pytest.mark.parametrize("sig, seed, whom", STOPS, ids=[f"{s.name}-{w}-{n}" for s, n, w in STOPS])
def test_a_stopped_flow_resumes_to_the_same_metrics(reference, sig, seed, whom):
    tmp, expected = reference
    name = f"stopped-{sig.name}-{whom}-{seed}"
    params = _params(tmp, name)
    proc = _flow(params)
    time.sleep(random.Random(seed).uniform(8, 25))  # somewhere in training or purification
    done = _finished_stages(tmp / name)
    if whom == "group":
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    print(f"{sig.name} to the {whom} after {len(done)} finished stages: {', '.join(done) or 'none'}")
    proc.communicate(timeout=120)
    deadline = time.time() + 30
    while _group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    alive = _group_alive(proc.pid)
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not alive, f"{sig.name}: a process of the stopped run is still alive after 30 s"
    again = _flow(params)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out.decode()[-2000:]
    root = tmp / name
    assert not list(root.rglob(".*.tmp")), "a temporary file was left behind"
    assert _metrics(root) == {k.replace("reference", name, 1): v for k, v in expected.items()}
