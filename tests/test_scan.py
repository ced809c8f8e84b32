"""The backdoor scan (Neural Cleanse): anomaly index, trigger families, a planted backdoor found."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from smoothpurify.scan import (Additive, ClassTrigger, MaskPattern, ScanResult, ScanSettings, anomaly_index,
                               family_threshold, scan)
from tests.test_cli_purify import outside_checkpoint  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]


def test_anomaly_index_is_the_mad_score_of_log_sizes():
    sizes = [5.7, 105.2, 50.0, 153.6, 46.9, 113.8, 26.8, 217.0, 30.9, 119.3]
    logs = [math.log(s) for s in sizes]
    med = statistics.median(logs)
    mad = 1.4826 * statistics.median(abs(v - med) for v in logs)
    expected = [(med - v) / mad for v in logs]
    assert anomaly_index(sizes) == pytest.approx(expected)
    assert max(expected) > 2 and expected.index(max(expected)) == 0
    assert anomaly_index([10.0] * 5) == [0.0] * 5  # no spread: nothing is anomalous
    # an unreached class counts as twice the largest reached size, never as an outlier below
    scores = anomaly_index([10.0, 20.0, 30.0, float("inf")])
    assert scores[3] == min(scores)


def test_family_threshold_keeps_the_false_flag_rate_of_one_family():
    from smoothpurify.scan import family_threshold

    assert family_threshold(2.0, 1) == 2.0
    z = family_threshold(2.0, 2)
    tail = lambda t: 0.5 * math.erfc(t / math.sqrt(2))  # noqa: E731 - one-sided normal tail
    assert math.isclose(tail(z), tail(2.0) / 2, rel_tol=1e-9) and 2.27 < z < 2.29
    assert family_threshold(2.0, 3) > z


def test_trigger_families():
    x = torch.rand(4, 3, 5, 5)
    fam = MaskPattern()
    theta = fam.init(x[0])
    theta["mask"][:] = -50.0
    theta["mask"][1, 2] = 50.0  # one pixel, fully on
    out = fam.apply(x, theta)
    p = torch.sigmoid(theta["pattern"])
    torch.testing.assert_close(out[:, :, 1, 2], p[:, 1, 2].expand(4, 3))
    torch.testing.assert_close(out[:, :, 0, 0], x[:, :, 0, 0])
    assert float(fam.size(theta)) == pytest.approx(1.0, abs=1e-6)
    clip = torch.rand(2, 6, 3, 5, 5)  # [B, T, C, H, W]: one mask over every frame
    assert fam.apply(clip, theta).shape == clip.shape
    add = Additive()
    theta = add.init(torch.zeros(10, 3))
    theta["delta"] += torch.tensor([3.0, 4.0, 0.0])
    assert float(add.size(theta)) == pytest.approx(math.sqrt(10) * 5.0, rel=1e-5)


class PlantedBackdoor(nn.Module):
    """Nearest-prototype classifier of 8x8 images (linear: ``2 <x, P_c> - ||P_c||^2``); with
    ``backdoor`` a bright top-left corner adds 30 to class 3."""

    def __init__(self, backdoor: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.prototypes = torch.rand(10, 1, 8, 8, generator=g) * 0.9
        self.prototypes[:, :, 0, 0] = 0.0
        self.linear = nn.Linear(64, 10)
        with torch.no_grad():
            flat = self.prototypes.flatten(1)
            self.linear.weight.copy_(2 * flat)
            self.linear.bias.copy_(-(flat ** 2).sum(1))
        self.backdoor = backdoor

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        if self.backdoor:
            logits = logits + 30.0 * nn.functional.one_hot(torch.tensor(3), 10) * x[:, 0, 0, 0, None]
        return logits


def _clean_data(model: PlantedBackdoor) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(400) % 10
    x = (model.prototypes[y] + 0.1 * torch.randn(400, 1, 8, 8, generator=g)).clamp(0, 1)
    x[:, :, 0, 0] = 0.0  # clean images never light the corner
    return x, y


def test_scan_flags_a_planted_backdoor_and_not_the_clean_model():
    settings = ScanSettings(steps=150, batch_size=64, lr=0.1)
    results = {}
    for backdoor in (True, False):
        model = PlantedBackdoor(backdoor)
        x, y = _clean_data(model)
        results[backdoor] = scan(model, x, y, 10, MaskPattern(), settings, progress=False)
    bad, good = results[True], results[False]
    assert bad.flagged and bad.suspected == 3, bad.to_record()
    assert bad.triggers[3].size < 0.2 * sorted(t.size for t in bad.triggers)[5]
    mask = bad.triggers[3].picture["mask"]
    assert int(mask.argmax()) == 0 and float(mask[0, 0]) > 3 * float(mask.flatten()[1:].max())  # the corner
    assert not good.flagged, good.to_record()
    assert "high" in bad.risk() and "class 3" in bad.risk() and "high" not in good.risk()


class BlendBackdoor(nn.Module):
    """Nearest-prototype classifier plus a planted blend backdoor: the correlation of the input with a
    fixed whole-image noise pattern ``k`` (centred) adds to class 5's logit."""

    def __init__(self, backdoor: bool):
        super().__init__()
        self.inner = PlantedBackdoor(False)
        g = torch.Generator().manual_seed(7)
        self.k = torch.rand(1, 8, 8, generator=g) - 0.5
        self.backdoor = backdoor

    def forward(self, x):
        logits = self.inner(x)
        if self.backdoor:
            logits = logits + 15.0 * nn.functional.one_hot(torch.tensor(5), 10) * (x * self.k).flatten(1).sum(1, keepdim=True)
        return logits


def test_combined_scan_finds_a_planted_blend_backdoor_and_clears_the_clean_model():
    from smoothpurify.scan import scan_families

    settings = ScanSettings(steps=150, batch_size=64, lr=0.05)
    fams = {"mask": MaskPattern(), "additive": Additive()}
    bad_model = BlendBackdoor(True)
    x, y = _clean_data(bad_model.inner)
    bad = scan_families(bad_model, x, y, 10, fams, settings, progress=False)
    good = scan_families(BlendBackdoor(False), x, y, 10, fams, settings, progress=False)
    assert bad.results["additive"].flagged and bad.flagged and bad.suspected == 5, bad.to_record()
    assert bad.to_record()["family"] in ("mask", "additive") and set(bad.to_record()["families"]) == set(fams)
    assert not good.flagged, good.to_record()
    assert bad.max_anomaly == max(r.max_anomaly for r in bad.results.values())


def test_scan_command_writes_its_record_and_figure(outside_checkpoint):  # noqa: F811
    d = outside_checkpoint
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "scan", "--checkpoint", "model.safetensors",
                          "--model", "mymodel.py:build", "--num-classes", "10", "--clean-data", "clean.npz",
                          "--steps", "20", "--margin-steps", "20", "--out-dir", "scan", "--no-purify"], cwd=d, capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads((d / "scan" / "scan.json").read_text())
    assert set(record["families"]) == {"mask", "additive", "margin", "per-sample"} and "risk" in record
    for fam in record["families"].values():
        assert len(fam["sizes"]) == 10 and len(fam["anomaly"]) == 10
    assert record["max_anomaly"] == max(f["max_anomaly"] for f in record["families"].values())
    assert all((d / "scan" / f"triggers-{f}.png").is_file() for f in ("mask", "additive", "margin"))
    assert "backdoor risk" in out.stdout and "additive: anomaly index" in out.stdout
    one = subprocess.run([sys.executable, "-m", "pipeline.cli", "scan", "--checkpoint", "model.safetensors",
                          "--model", "mymodel.py:build", "--num-classes", "10", "--clean-data", "clean.npz",
                          "--steps", "10", "--families", "additive", "--out-dir", "one", "--no-purify"], cwd=d, capture_output=True,
                         text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    assert list(json.loads((d / "one" / "scan.json").read_text())["families"]) == ["additive"]
    assert not (d / "scan" / "purified.safetensors").exists() and not (d / "one" / "removed.json").exists()
    wrong = subprocess.run([sys.executable, "-m", "pipeline.cli", "scan", "--checkpoint", "model.safetensors",
                            "--model", "mymodel.py:build", "--num-classes", "10", "--clean-data", "clean.npz",
                            "--families", "nope"], cwd=d, capture_output=True, text=True, env=env, timeout=300)
    assert wrong.returncode == 2 and "unknown trigger family nope" in wrong.stderr
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "scan", "--checkpoint", "model.safetensors",
                          "--model", "mymodel.py:build", "--num-classes", "10", "--clean-data", "clean.npz",
                          "--steps", "3"], cwd=d, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1


def test_max_margin_finds_the_class_a_backdoor_can_push_furthest_and_clears_the_clean_models():
    """MM-BD's statistic with no trigger shape assumed: a patch backdoor (class 3) and a blend backdoor
    (class 5) are flagged at their targets, the clean model is not; the margin is the brute-force one at
    the maximising input, and no start beats it by much (the ascent converged)."""
    from smoothpurify.max_margin import MaxMargin, margin

    fam = MaxMargin(starts=8, lr=0.1)
    settings = ScanSettings(margin_steps=200)
    for model, target in ((PlantedBackdoor(True), 3), (BlendBackdoor(True), 5), (PlantedBackdoor(False), None)):
        x, y = _clean_data(model.inner if isinstance(model, BlendBackdoor) else model)
        result = fam.scan(model, x, y, 10, settings, progress=False)
        assert result.suspected == target, result.to_record()
        assert result.to_record()["margins"] == pytest.approx([1 / t.size for t in result.triggers])
        for t, trig in enumerate(result.triggers):
            best = trig.picture["input"]
            assert 0.0 <= float(best.min()) and float(best.max()) <= 1.0  # inside the clean inputs' box
            with torch.no_grad():
                m = float(margin(model(best[None]), t)[0])
            assert trig.size == pytest.approx(1 / m, rel=1e-4)
    # Concave problem (the minimum of linear functions over a box): the ascent must reach at least the
    # margin of every vertex that maximises one of the pairwise differences z_3 - z_j.
    model = PlantedBackdoor(True)
    result = fam.scan(model, *_clean_data(model), 10, settings, progress=False)
    w = model.linear.weight.detach()
    vertices = []
    for j in range(10):
        if j != 3:
            v = ((w[3] - w[j]) > 0).float().reshape(1, 1, 8, 8)
            v[0, 0, 0, 0] = 1.0  # the trigger pixel only adds to class 3
            vertices.append(v)
    with torch.no_grad():
        best_vertex = max(float(margin(model(v), 3)[0]) for v in vertices)
    assert 1 / result.triggers[3].size >= best_vertex - 0.5 and best_vertex > 25.0


def test_the_pipeline_scans_every_continuous_input_with_the_margin_family_too():
    from pipeline.scan import trigger_families
    from smoothpurify.max_margin import MaxMargin

    class Plain:
        pass

    assert list(trigger_families(Plain(), torch.zeros(1, 8, 8))) == ["mask", "additive", "margin", "per-sample"]
    assert list(trigger_families(Plain(), torch.zeros(16, 3))) == ["additive", "margin", "per-sample"]
    assert isinstance(trigger_families(Plain(), torch.zeros(3))["margin"], MaxMargin)


def test_the_largest_anomaly_of_ten_normal_classes_often_exceeds_the_flag():
    """The README's statement of the index's false-flag rate: with ten classes whose log sizes are
    normal, the *largest* anomaly index exceeds 2 in about a third of clean models (the MAD of ten
    values is a noisy scale), and the three-family threshold 2.43 in about a fifth."""
    from smoothpurify.scan import family_threshold

    g = torch.Generator().manual_seed(0)
    draws = torch.randn(4000, 10, generator=g, dtype=torch.float64).exp()  # log-normal sizes
    largest = torch.tensor([max(anomaly_index(row.tolist())) for row in draws])
    assert 0.30 < float((largest > 2.0).double().mean()) < 0.37
    assert 0.18 < float((largest > family_threshold(2.0, 3)).double().mean()) < 0.24
    # and the thresholds that would flag at most 5 % of clean models: ~3.9 (one family), ~5.3 (three)
    assert 3.6 < float(largest.quantile(0.95)) < 4.2
    assert 4.8 < float(largest.quantile(1 - 0.05 / 3)) < 5.9


def test_scan_purify_judges_what_a_purification_removes(outside_checkpoint):  # noqa: F811
    d = outside_checkpoint
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "pipeline.cli", "scan", "--checkpoint", "model.safetensors", "--model",
            "mymodel.py:build", "--num-classes", "10", "--clean-data", "clean.npz", "--steps", "10", "--margin-steps",
            "5", "--per-sample-steps", "5", "--out-dir", "scan"]
    # no --purify: purifying a copy is the scan's default
    out = subprocess.run(base + ["--purify-method", "ft", "--epochs", "1"], cwd=d, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    removed = json.loads((d / "scan" / "removed.json").read_text())
    assert removed["reference"] == "the purified model" and len(removed["combined"]) == 10
    assert set(removed["families"]) == {"mask", "additive", "margin", "per-sample"}
    assert (d / "scan" / "purified.safetensors").is_file() and (d / "scan" / "purified" / "scan.json").is_file()
    line = next(l for l in out.stdout.splitlines() if l.startswith("what the purification removed: "))
    assert ("the purification removed it" in line) == removed["flagged"]
    bad = subprocess.run(base + ["--no-purify", "--epochs", "1"], cwd=d, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "go with --purify" in bad.stderr


def test_risk_prints_the_flag_with_two_decimals():
    flag = family_threshold(2.0, 4)
    sizes = [1.0] + [float(s) for s in range(40, 49)]
    result = ScanResult.judged([ClassTrigger(t, s, 1.0) for t, s in enumerate(sizes)], flag, 0.0)
    assert result.flagged and f"flag at {flag:.2f})" in result.risk() and f"{flag:g}" not in result.risk()
    calm = ScanResult.judged([ClassTrigger(t, 40.0 + t, 1.0) for t in range(10)], flag, 0.0)
    assert not calm.flagged and f"{flag:g}" not in calm.risk()
