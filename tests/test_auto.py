"""``--method auto``: the clean data and the scan choose among candidates; never test ASR."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.auto import auto_runner
from smoothpurify.purify import PurifyResult
from tests.test_cli_purify import outside_checkpoint, run_cli  # noqa: F401 - fixture


def _fake(outcomes: dict[str, tuple[float, float]], calls: list[str]):
    """make_runner stand-in: method -> (clean accuracy after, anomaly of the result); the result's
    weight holds the method's index so the test can see which model came back."""
    names = list(outcomes)

    def make_runner(name, overrides=None):
        def run(model, x, y, likelihood, **kw):
            calls.append(name)
            assert float(model.weight.detach().sum()) == 0.0, "a candidate did not start from the received model"
            with torch.no_grad():
                model.weight.fill_(1.0)  # a careless runner that edits the received model in place
            out = nn.Linear(2, 2)
            with torch.no_grad():
                out.weight.fill_(names.index(name) + 1)  # 0 is the received model
            rec = {"method": name, "val_acc_start": 0.9, "val_acc_end": outcomes[name][0], "diverged": False,
                   "seconds": {"total": 1.0}}
            return PurifyResult(out, rec)
        return {}, run
    return make_runner


def _fake_scan(anomalies: list[float]):
    """A scan result with one anomaly per class (two classes are enough), flagged above 2."""
    top = max(range(len(anomalies)), key=lambda c: anomalies[c])
    return SimpleNamespace(max_anomaly=anomalies[top], flagged=anomalies[top] > 2.0, threshold=2.0,
                           suspected=top if anomalies[top] > 2.0 else None, seconds=0.1,
                           anomaly_of=lambda c: anomalies[c])


def _scan(outcomes, received=(1.0, 0.0)):
    """outcomes: method -> (accuracy, anomaly of class 1, or per-class anomalies); the received model's
    per-class anomalies are ``received``."""
    names = list(outcomes)

    def scan_fn(model):
        index = int(model.weight.detach()[0, 0])
        if index == 0:
            return _fake_scan(list(received))
        a = outcomes[names[index - 1]][1]
        return _fake_scan(list(a) if isinstance(a, tuple) else [0.0, a])
    return scan_fn


def _run(outcomes, received=(1.0, 0.0), **kw):
    calls: list[str] = []
    runner = auto_runner(_scan(outcomes, received), tuple(outcomes), make_runner=_fake(outcomes, calls), **kw)
    received = nn.Linear(2, 2)
    with torch.no_grad():
        received.weight.zero_()
    return runner(received, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), None), calls


def test_the_first_candidate_the_scan_clears_is_returned_and_the_rest_never_run():
    result, calls = _run({"a": (0.88, 1.1), "b": (0.89, 0.5), "c": (0.9, 0.2)})
    assert calls == ["a"] and result.record["auto"]["chosen"] == "a" and result.record["method"] == "auto (a)"


def test_accuracy_loss_drops_a_candidate_and_the_smallest_anomaly_wins_among_flagged():
    outcomes = {"a": (0.88, 4.0), "b": (0.70, 0.1), "c": (0.87, 2.5), "d": (0.89, 3.0)}
    result, calls = _run(outcomes)
    assert calls == ["a", "b", "c", "d"]
    trials = {t["method"]: t for t in result.record["auto"]["candidates"]}
    assert trials["b"]["kept"] is False and "max_anomaly" not in trials["b"]  # b lost 20 points: never scanned
    assert result.record["auto"]["chosen"] == "c" and float(result.model.weight.detach()[0, 0]) == 3.0


def test_the_received_models_flagged_class_is_followed_and_a_new_flag_elsewhere_is_a_side_effect():
    # received: class 0 flagged (3.5). a: class 0 gone but class 1 flagged now -> clear, chosen at once
    result, calls = _run({"a": (0.88, (-0.5, 2.6)), "b": (0.89, (0.0, 0.0))}, received=(3.5, 0.0))
    trial = result.record["auto"]["candidates"][0]
    assert calls == ["a"] and trial["clear"] and trial["new_flag"] == 1 and trial["flagged"]
    assert result.record["auto"]["received"]["suspected"] == 0
    # a keeps class 0 anomalous (2.4, though it is not a's largest) -> not clear; b removes it
    result, calls = _run({"a": (0.88, (2.4, 3.0)), "b": (0.89, (0.1, 0.0))}, received=(3.5, 0.0))
    assert calls == ["a", "b"] and result.record["auto"]["chosen"] == "b"
    # neither clears class 0: the smaller residual anomaly of class 0 wins, not the smaller largest one
    result, _ = _run({"a": (0.88, (2.3, 0.0)), "b": (0.89, (2.9, -9.0))}, received=(3.5, 0.0))
    assert result.record["auto"]["chosen"] == "a"


def test_residual_in_words():
    from smoothpurify.scan import residual, residual_line

    before, after = _fake_scan([3.5, 0.0]), _fake_scan([-0.5, 2.6])
    res = residual(before, after)
    assert res == {"tracked": 0, "anomaly": -0.5, "cleared": True, "new_flag": 1}
    line = residual_line(res, 2.0)
    assert "no longer anomalous" in line and "class 1 is flagged now" in line
    res = residual(_fake_scan([1.0, 0.0]), after)
    assert res["tracked"] is None and not res["cleared"] and "not flagged, so there is no class" in residual_line(res, 2.0)


def test_clean_but_inaccurate_candidates_are_skipped_until_one_holds():
    result, calls = _run({"a": (0.80, 0.1), "b": (0.87, 0.3), "c": (0.9, 0.0)})
    assert calls == ["a", "b"] and result.record["auto"]["chosen"] == "b"
    result, _ = _run({"a": (0.80, 0.1), "b": (0.87, 0.3)}, acc_tolerance=0.15)
    assert result.record["auto"]["chosen"] == "a"


def test_no_candidate_kept_is_an_error_not_a_model():
    with pytest.raises(SmoothPurifyError, match="every candidate"):
        _run({"a": (0.5, 0.1), "b": (0.6, 0.0)})
    with pytest.raises(SmoothPurifyError, match="unknown purification method"):
        auto_runner(lambda m: None, ("recommended", "no-such-method"))


def test_auto_from_the_command_line(outside_checkpoint):  # noqa: F811
    d = outside_checkpoint
    out = run_cli("--checkpoint", "model.safetensors", "--model", "mymodel.py:build", "--num-classes", "10",
                  "--clean-data", "clean.npz", "--test-data", "test.npz", "--method", "auto", "--epochs", "2",
                  "--out", "auto.safetensors", cwd=d)
    assert out.returncode == 0, out.stderr
    record = json.loads((d / "auto.record.json").read_text())
    chosen = record["auto"]["chosen"]
    assert chosen in ("recommended", "fst", "ft-sam") and record["method"] == f"auto ({chosen})"
    assert record["auto"]["candidates"][0]["method"] == "recommended" and record["config"]["epochs"] == 2
    assert "auto: recommended" in out.stdout and (d / "auto.safetensors").is_file()
    assert "auto: the received model" in out.stdout and "flagged" in record["auto"]["received"]


def test_purify_scan_reports_the_received_models_class_after_purification(outside_checkpoint):  # noqa: F811
    d = outside_checkpoint
    out = run_cli("--checkpoint", "model.safetensors", "--model", "mymodel.py:build", "--num-classes", "10",
                  "--clean-data", "clean.npz", "--method", "ft", "--epochs", "1", "--scan",
                  "--out", "ft.safetensors", cwd=d)
    assert out.returncode == 0, out.stderr
    assert "received model: backdoor risk" in out.stdout and "purified model: backdoor risk" in out.stdout
    line = next(l for l in out.stdout.splitlines() if l.startswith("before and after: "))
    assert ("flagged in the received model" in line) or ("received model was not flagged" in line)
    assert (d / "ft.scan-received" / "scan.json").is_file() and (d / "ft.scan-purified" / "scan.json").is_file()
    removed = json.loads((d / "ft.scan-removed.json").read_text())
    assert removed["reference"] == "the purified model" and len(removed["combined"]) == 10
    line = next(l for l in out.stdout.splitlines() if l.startswith("what the purification removed: "))
    assert ("the purification removed it" in line) == removed["flagged"]
