"""The report's verdict: each rule at its boundary, any modality's metrics, thresholds from params;
and the figures' legibility check."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from smoothpurify import SmoothPurifyError
from smoothpurify.metrics import BACKDOOR_METRICS, Metric, metric_with_role
from pipeline.report.plots import MAX_WIDTH_IN, check_legible, plot_curves, plot_density, plot_tsne, plot_verdict
from pipeline.report.verdict import VerdictThresholds, attack_verdicts, classify, overall_sentence

T = VerdictThresholds()


@pytest.mark.parametrize("before, after, change, diverged, expected", [
    (100, 5.0, -5.0, False, "removed"),            # both thresholds are inclusive
    (100, 5.01, 0.0, False, "reduced"),
    (100, 1.0, -5.01, False, "removed at a cost"),
    (100, 50.0, 0.0, False, "reduced"),            # halved
    (100, 50.1, 0.0, False, "not removed"),
    (100, 0.0, 0.0, True, "diverged"),             # a destroyed model's ASR 0 is no removal
    (4.0, 1.0, 0.0, False, "no backdoor to remove"),
    (100, None, None, False, "not removed"),
])
def test_each_rule_at_its_boundary(before, after, change, diverged, expected):
    assert classify(before, after, change, diverged, T) == expected


def _rows(attack_key: str, clean_key: str, before: tuple, methods: dict) -> list[dict]:
    rows = [{"attack": "badnets", "method": "no defense", "reference": True, attack_key: before[0],
             clean_key: before[1]}]
    rows += [{"attack": "badnets", "method": m, "method_name": m, attack_key: a, clean_key: c}
             for m, (a, c) in methods.items()]
    return rows


def test_the_sentence_says_who_removed_it_with_the_numbers():
    rows = _rows("asr", "acc", (100.0, 92.0), {"ft": (99.5, 91.0), "fst": (1.2, 90.1), "sft": (40.0, 91.5)})
    (v,) = attack_verdicts(rows, BACKDOOR_METRICS, T)
    assert [r.get("verdict") for r in rows[1:]] == ["not removed", "removed", "reduced"]
    assert v.sentence() == ("badnets (ASR 100 % before): removed by fst (ASR 100 % -> 1.2 %, ACC -1.9 points); "
                            "reduced by sft (ASR 100 % -> 40 %, ACC -0.5 points); "
                            "not removed by ft (ASR 100 % -> 99.5 %, ACC -1.0 points).")
    assert overall_sentence([v]) == "The backdoor was removed for 1 of 1 attack(s) by at least one method."


def test_nothing_removed_says_so():
    rows = _rows("asr", "acc", (100.0, 92.0), {"ft": (99.5, 91.0)})
    verdicts = attack_verdicts(rows, BACKDOOR_METRICS, T)
    assert overall_sentence(verdicts).startswith("No method removed the backdoor")


def test_any_modality_metrics_drive_the_verdict():
    # BLEU is not a percentage and higher is better; ASR of a translation backdoor is lower-better
    bleu, asr = Metric("bleu", "BLEU", True, percent=False, role="clean"), Metric("asr", "ASR %", False, role="attack")
    rows = _rows("asr", "bleu", (90.0, 30.0), {"sft": (3.0, 27.5), "ngf": (2.0, 20.0)})
    (v,) = attack_verdicts(rows, (bleu, asr), VerdictThresholds(removed_at=5, max_clean_drop=3))
    assert {m.method: m.status for m in v.methods} == {"sft": "removed", "ngf": "removed at a cost"}
    assert "BLEU -2.5 points" in v.sentence()
    # without declared roles: the first lower-is-better metric is the attack's, the first higher the clean one
    mAP, rate = Metric("map", "mAP %", True), Metric("asr", "ASR %", False)
    assert metric_with_role((mAP, rate), "clean") is mAP and metric_with_role((mAP, rate), "attack") is rate


def test_thresholds_come_from_params_and_bad_ones_are_one_line():
    t = VerdictThresholds.from_params({"report": {"verdict": {"removed_at": 2, "max_clean_drop": 1}}})
    assert (t.removed_at, t.max_clean_drop) == (2, 1)
    assert "at most 2 %" in t.sentence(BACKDOOR_METRICS[0], BACKDOOR_METRICS[1])
    with pytest.raises(SmoothPurifyError, match="report.verdict.removed_at"):
        VerdictThresholds.from_params({"report": {"verdict": {"removed_at": 150}}})
    with pytest.raises(SmoothPurifyError, match="report.verdict.typo"):
        VerdictThresholds.from_params({"report": {"verdict": {"typo": 1}}})


# -- legibility ---------------------------------------------------------------------------------------

def test_the_check_refuses_small_text_and_wide_figures():
    fig = Figure(figsize=(6, 3))
    fig.subplots().set_title("fine", fontsize=10)
    check_legible(fig)
    fig.axes[0].text(0, 0, "tiny", fontsize=6)
    with pytest.raises(ValueError, match="below the 9.0 pt"):
        check_legible(fig)
    with pytest.raises(ValueError, match="wide"):
        check_legible(Figure(figsize=(MAX_WIDTH_IN + 1, 3)))


def test_every_report_figure_fits_the_page_with_many_models(tmp_path):
    from PIL import Image

    grid = np.linspace(-1, 50, 60)
    series = [{"label": f"model {i} (after)", "grid": grid, "values": np.exp(-np.abs(grid - i)), "lambda_max": 50.0,
               "trace_h": -342.0, "trace_h_stderr": 465.0} for i in range(8)]
    curves = {f"m{i}": [{"epoch": e, "asr": 1 - e / 10, "acc": 0.9, "val_loss": 1 / (e + 1)} for e in range(5)]
              for i in range(7)}
    rng = np.random.default_rng(0)
    panels = {f"model {i}": rng.normal(size=(40, 5)) for i in range(7)}
    groups = {a: [{"method": m, "status": "removed", "attack": 3.0, "clean": 90.0} for m in ("none", "ft", "sft",
                                                                                           "fsft", "ngf", "fst")]
              for a in ("badnets", "blend", "trojan")}
    pngs = [plot_density(series, tmp_path / "d.png", title="density"),
            plot_curves(curves, tmp_path / "c.png", title="curves"),
            plot_tsne(panels, rng.integers(0, 3, 40), rng.random(40) < 0.3, tmp_path / "t.png", title="t-SNE"),
            plot_verdict(groups, tmp_path / "v.png", "ASR %", "ACC %", 5.0, title="verdict")]
    for png in pngs:  # each was checked before saving; the saved width is what the page shows
        assert Image.open(png).size[0] <= round(MAX_WIDTH_IN * 110)


def test_the_parameters_block_shows_what_ran_only():
    from pipeline.report.document import params_as_run

    params = {"profile": "smoke", "seed": 0, "profiles": {"smoke": {}},
              "image": {"attacks": ["badnets", "blend", "trojan", "sig"],
                        "attack": {"options": {"blend": {"alpha": 0.2}, "sig": {"alpha": 0.2}},
                                   "variants": {"badnets-50": {"attack": "badnets", "poison_rate": 0.5},
                                                "blend-a2a": {"attack": "blend", "mapping": "all2all"}}}},
              "multilabel": {"attacks": ["appearing"]},
              "purify": {"methods": ["ft", "sft", "ngf", "fp"], "overrides": {"fp": {"x": 1}, "sft": {"y": 2}}}}
    shown = params_as_run(params, "image", ["badnets-50", "blend"], ["ft", "sft"])
    assert "multilabel" not in shown and "profiles" not in shown
    assert shown["image"]["attacks"] == ["badnets-50", "blend"]
    assert shown["image"]["attack"]["variants"] == {"badnets-50": {"attack": "badnets", "poison_rate": 0.5}}
    assert shown["image"]["attack"]["options"] == {"blend": {"alpha": 0.2}}
    assert shown["purify"]["methods"] == ["ft", "sft"] and shown["purify"]["overrides"] == {"sft": {"y": 2}}
    assert params["image"]["attacks"] == ["badnets", "blend", "trojan", "sig"]  # the caller's dict is untouched
