"""The scan against a clean reference: the null threshold, the relative anomaly, the re-initialised copy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.scan import ClassTrigger, CombinedScan, ScanResult, residual
from smoothpurify.scan_reference import ReferencedScan, null_threshold, reinitialised
from tests.test_cli_purify import outside_checkpoint  # noqa: F401 - fixture


def combined(per_family: dict[str, list[float]]) -> CombinedScan:
    return CombinedScan({name: ScanResult.judged([ClassTrigger(t, s, 1.0) for t, s in enumerate(sizes)], 2.0, 1.0)
                         for name, sizes in per_family.items()})


def test_null_threshold_is_the_quantile_of_the_largest_stouffer_sum_of_normal_classes():
    # an independent Monte Carlo (numpy, another generator) of the same null
    rng = np.random.default_rng(1)
    logs = rng.normal(size=(100000, 3, 10))
    med = np.median(logs, axis=-1, keepdims=True)
    a = (med - logs) / (1.4826 * np.median(np.abs(logs - med), axis=-1, keepdims=True))
    expected = np.quantile(a.sum(1).max(-1) / math.sqrt(3), 0.95)
    assert null_threshold(10, 3) == pytest.approx(expected, abs=0.1)
    assert null_threshold(10, 1) == pytest.approx(np.quantile(a[:, 0].max(-1), 0.95), abs=0.1)
    assert null_threshold(10, 3, 0.01) > null_threshold(10, 3)
    with pytest.raises(SmoothPurifyError):
        null_threshold(2, 1)


def test_a_class_easy_in_the_reference_too_is_not_flagged_a_class_easy_only_in_the_model_is():
    rng = np.random.default_rng(0)
    base = np.exp(rng.normal(0, 0.3, size=10))  # the classes' natural sizes
    hub = base.copy()
    hub[8] /= 20  # a natural hub: easy in every model trained on this data
    noise = lambda: np.exp(rng.normal(0, 0.05, size=10))  # noqa: E731 - the searches' own noise
    families = ("mask", "additive", "margin")
    reference = combined({f: list(hub * noise()) for f in families})
    clean = combined({f: list(hub * noise()) for f in families})
    assert clean.flagged and clean.suspected == 8  # without the reference, the hub is a false flag
    judged = ReferencedScan(clean, reference)
    assert not judged.flagged and judged.max_anomaly < judged.threshold

    backdoored = hub.copy()
    backdoored[0] /= 10  # the attacker's target, easy for every search
    bad = ReferencedScan(combined({f: list(backdoored * noise()) for f in families}), reference)
    assert bad.flagged and bad.suspected == 0
    assert bad.anomaly_of(0) == pytest.approx(sum(r.anomaly[0] for r in bad.results.values()) / math.sqrt(3))
    assert "class 0" in bad.risk() and "high" in bad.risk()
    rec = bad.to_record()
    assert rec["reference"] and rec["families"]["mask"]["reference_sizes"][8] < rec["families"]["mask"]["sizes"][0] * 100
    # before/after: the purified (here: the clean) model clears the class the received one was flagged at
    left = residual(bad, judged)
    assert left["tracked"] == 0 and left["cleared"]


def test_referenced_scan_needs_the_same_families():
    with pytest.raises(SmoothPurifyError, match="other families"):
        ReferencedScan(combined({"mask": [1.0] * 4}), combined({"additive": [1.0] * 4}))


def test_reinitialised_draws_every_parameter_afresh_and_refuses_a_module_it_cannot_reset():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 1, 5, 5))
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    fresh = reinitialised(model)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert not torch.equal(p, q) or name.startswith("1."), name  # batch norm's affine restarts at 1, 0
    assert torch.equal(fresh[1].weight, torch.ones(4)) and torch.equal(fresh[1].running_mean, torch.zeros(4))
    assert torch.equal(model[1].running_mean, torch.full((4,), 3.0))  # the received model is untouched

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) * self.scale

    with pytest.raises(SmoothPurifyError, match="scale"):
        reinitialised(Scaled())


def test_a_planted_backdoor_is_flagged_against_a_trained_reference_and_the_clean_model_is_not():
    """The whole path: the reference is the model's architecture re-initialised and trained on the clean
    data, both scanned with two families; the backdoor's class stands out, the clean model does not."""
    from smoothpurify.likelihood import Categorical
    from smoothpurify.scan import Additive, MaskPattern, ScanSettings, scan_families
    from smoothpurify.scan_reference import ReferenceTraining, train_reference
    from tests.test_scan import PlantedBackdoor, _clean_data

    settings = ScanSettings(steps=150, batch_size=64, lr=0.1)
    fams = lambda: {"mask": MaskPattern(), "additive": Additive()}  # noqa: E731
    clean_model = PlantedBackdoor(False)
    x, y = _clean_data(clean_model)
    ref = train_reference(clean_model, x, y, Categorical(), settings=ReferenceTraining(epochs=40), progress=False)
    assert float((ref(x).argmax(1) == y).float().mean()) > 0.9  # it learnt the clean task
    assert not torch.equal(ref.linear.weight, clean_model.linear.weight)
    reference = scan_families(ref, x, y, 10, fams(), settings, progress=False)
    good = ReferencedScan(scan_families(clean_model, x, y, 10, fams(), settings, progress=False), reference)
    bad = ReferencedScan(scan_families(PlantedBackdoor(True), x, y, 10, fams(), settings, progress=False), reference)
    assert bad.flagged and bad.suspected == 3, bad.combined
    assert not good.flagged, good.combined


def test_scanner_trains_and_scans_the_reference_once_for_every_model(monkeypatch):
    import pipeline.scan as PS
    from modalities.image import ImageModality
    from tests.test_scan import PlantedBackdoor, _clean_data

    calls = []
    real = PS.reference_scan

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(PS, "reference_scan", counted)
    from smoothpurify.scan import ScanSettings

    model = PlantedBackdoor(True)
    clean = _clean_data(model)
    scan_one = PS.scanner(ImageModality(), clean, 10, reference=True, settings=ScanSettings(steps=10),
                          families=["additive"], progress=False)
    first, second = scan_one(model), scan_one(PlantedBackdoor(False))
    assert len(calls) == 1 and isinstance(first, ReferencedScan) and second.reference is first.reference
    plain = PS.scanner(ImageModality(), clean, 10, reference=False, settings=ScanSettings(steps=10),
                       families=["additive"], progress=False)(model)
    assert isinstance(plain, CombinedScan) and len(calls) == 1


def test_scan_command_with_reference_records_the_combined_judgement(outside_checkpoint):  # noqa: F811
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    d = outside_checkpoint
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "scan", "--checkpoint", "model.safetensors",
                          "--model", "mymodel.py:build", "--num-classes", "10", "--clean-data", "clean.npz",
                          "--steps", "10", "--families", "mask,additive", "--reference", "--out-dir", "ref", "--no-purify"],
                         cwd=d, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads((d / "ref" / "scan.json").read_text())
    assert record["reference"] and len(record["combined"]) == 10 and set(record["families"]) == {"mask", "additive"}
    assert record["threshold"] == pytest.approx(null_threshold(10, 2))
    assert all(len(f["reference_sizes"]) == 10 for f in record["families"].values())
    assert "combined over the families" in out.stdout and "against the reference" in out.stdout


def test_removal_names_the_class_the_purification_made_harder_to_reach():
    from pipeline.scan import removal, removal_line

    rng = np.random.default_rng(2)
    natural = np.exp(rng.normal(0, 0.3, size=10))
    natural[8] /= 20  # a hub both models share
    noise = lambda: np.exp(rng.normal(0, 0.05, size=10))  # noqa: E731
    families = ("mask", "additive", "margin")
    received = natural.copy()
    received[0] /= 10
    purified = combined({f: list(natural * noise()) for f in families})
    judged = removal(combined({f: list(received * noise()) for f in families}), purified)
    assert judged.flagged and judged.suspected == 0 and "removed it" in removal_line(judged)
    # a model the purification changed only by noise: nothing was removed
    calm = removal(combined({f: list(natural * noise()) for f in families}), purified)
    assert not calm.flagged and "no sign" in removal_line(calm)
    # the scans of a referenced run are unwrapped: received and purified are compared directly
    wrapped = removal(ReferencedScan(combined({f: list(received * noise()) for f in families}), purified),
                      ReferencedScan(purified, purified))
    assert wrapped.suspected == 0
