"""The scan as a pipeline stage: off by default (a one-line record), on: before/after records, figures,
and a report section beside the measured ASR."""
from __future__ import annotations

import json

import pytest

import pipeline
from pipeline.report.document import write_report
from pipeline.run import Run
from pipeline.scan import scan_settings, scan_stage
from smoothpurify import SmoothPurifyError


def test_scan_stage_off_then_on_and_in_the_report(tiny_params):
    params = tiny_params
    pipeline.prepare("image", params)
    pipeline.train_attack("image", params, "badnets", progress=False)
    pipeline.evaluate("image", params, "badnets")
    pipeline.purify("image", params, "badnets", "ft", progress=False)
    run = Run("image", params)
    assert scan_stage("image", params, "badnets", "backdoored") == {"enabled": False}
    assert json.loads(run.scan_record("badnets", "backdoored").read_text()) == {"enabled": False}

    params["scan"] = {"enabled": True, "steps": 10, "margin_steps": 5, "per_sample_steps": 5}
    before = scan_stage("image", params, "badnets", "backdoored", progress=False)
    after = scan_stage("image", params, "badnets", "purified/ft", progress=False)
    for rec in (before, after):
        assert rec["enabled"] and set(rec["families"]) == {"mask", "additive", "margin", "per-sample"}
        assert len(rec["families"]["margin"]["margins"]) == 10
        assert rec["max_anomaly"] == max(f["max_anomaly"] for f in rec["families"].values())
        assert all(len(f["anomaly"]) == 10 for f in rec["families"].values())
    assert run.scan_record("badnets", "purified/ft").name == "badnets-purified-ft.json"
    assert (run.root / "scan" / "badnets" / "purified-ft" / "triggers-mask.png").is_file()
    # unchanged model and settings: the record is reused, not recomputed
    assert scan_stage("image", params, "badnets", "backdoored", progress=False) == before
    md, _ = write_report("image", params, ["badnets"], ["ft"], figures=False)
    text = md.read_text()
    assert "## Backdoor scan" in text and "| badnets | backdoored |" in text and "| badnets | ft |" in text
    # the purified row carries the received model judged against it, rebuilt from the two records
    from pipeline.scan import removal, scan_from_record
    judged = removal(scan_from_record(before), scan_from_record(after))
    top = max(range(10), key=judged.combined.__getitem__)
    assert "removed (received vs this)" in text and f"{judged.combined[top]:.2f} (class {top})" in text
    assert scan_from_record(before).results["mask"].anomaly == before["families"]["mask"]["anomaly"]


@pytest.mark.parametrize("section,msg", [({"steps": 5}, "at least 10"), ({"when": 1}, "unknown key"),
                                         ({"margin_steps": 0}, "margin_steps must be at least 1"),
                                         ({"per_sample_steps": 0}, "per_sample_steps must be at least 1")])
def test_a_bad_scan_section_is_one_clear_error(section, msg):
    with pytest.raises(SmoothPurifyError, match=msg):
        scan_settings({"scan": section})


def test_token_inputs_are_refused_with_the_reason():
    import torch
    from torch import nn

    from pipeline.scan import scan_model

    model = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(12, 3))
    clean = (torch.randint(0, 20, (30, 3)), torch.arange(30) % 3)
    with pytest.raises(SmoothPurifyError, match="embedding space"):
        scan_model(object(), model, clean, 3, progress=False)
