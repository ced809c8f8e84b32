"""The regression check: metrics made worse on purpose fail, by each metric's direction and tolerance."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.regression import compare
from smoothpurify.metrics import BACKDOOR_METRICS

ROOT = Path(__file__).resolve().parents[1]
ACCEPTED = {"badnets-recommended": {"asr": 1.0, "acc": 86.9, "ra": 80.0}, "badnets-ft": {"asr": 100.0, "acc": 87.7}}


def test_compare_judges_attack_up_and_clean_down_beyond_tolerance():
    same = {k: dict(v) for k, v in ACCEPTED.items()}
    assert compare(same, ACCEPTED, BACKDOOR_METRICS) == []
    within = {"badnets-recommended": {"asr": 5.9, "acc": 85.0, "ra": 0.0}, "badnets-ft": {"asr": 90.0, "acc": 99.0}}
    assert compare(within, ACCEPTED, BACKDOOR_METRICS) == []  # RA is never judged; better is never a failure
    worse = {"badnets-recommended": {"asr": 6.1, "acc": 84.8, "ra": 80.0}}
    lines = [f.line() for f in compare(worse, ACCEPTED, BACKDOOR_METRICS)]
    assert lines == ["badnets-ft: missing (accepted, not in this run)",
                     "badnets-recommended: ASR % 1.00 -> 6.10 (rose 5.10 points; tolerance 5)",
                     "badnets-recommended: ACC % 86.90 -> 84.80 (fell 2.10 points; tolerance 2)"]
    assert compare(worse, ACCEPTED, BACKDOOR_METRICS, {"attack": 10, "clean": 3})[1:] == []


def run_regression(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flows.regression", "--no-run", *args], cwd=run_dir,
                          capture_output=True, text=True, env=env, timeout=300)


def test_regression_entry_accepts_then_fails_a_run_made_worse(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["run_dir"] = str(tmp_path / "runs")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cells = tmp_path / "runs" / "image" / "metrics" / "cells"
    cells.mkdir(parents=True)
    for name, values in ACCEPTED.items():
        (cells / f"{name}.json").write_text(json.dumps(values))
    assert run_regression(tmp_path, "--accept").returncode == 0
    assert (tmp_path / "regression" / "image.json").is_file()
    ok = run_regression(tmp_path)
    assert ok.returncode == 0 and "within tolerance" in ok.stdout
    (cells / "badnets-recommended.json").write_text(json.dumps({"asr": 40.0, "acc": 86.9, "ra": 50.0}))
    bad = run_regression(tmp_path)
    assert bad.returncode == 1 and "badnets-recommended: ASR % 1.00 -> 40.00" in bad.stderr
