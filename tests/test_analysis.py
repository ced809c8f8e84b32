"""Smoothness analysis: the batch, the estimators against a dense Hessian, the stage on a real tiny
run, the curve helpers and the plots."""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_images
from smoothpurify import SmoothPurifyError
from smoothpurify.smoothness import AnalysisSettings, analysis_settings, analyze_model, build_analysis_batch
from pipeline.analysis import analyze_stage
from pipeline.curves import curve_evaluator, lambda_max_fn, write_curves_csv
from smoothpurify.hessian import fisher_trace_value
from smoothpurify.likelihood import Categorical
from smoothpurify.parametrize import prepare
from pipeline.report.plots import plot_curves, plot_density, plot_tsne

PNG = b"\x89PNG\r\n\x1a\n"
FAST = {"n_clean": 40, "n_poison": 40, "lanczos_steps": 6, "n_probes": 3, "grid": 100}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- the batch ---------------------------------------------------------------------------------------

def test_batch_is_clean_then_poisoned_with_true_labels_and_seeded():
    x, y = torch.arange(50.0).view(50, 1), torch.arange(50) % 5
    xp, yp = -torch.arange(30.0).view(30, 1), torch.arange(30) % 4 + 1
    inputs, targets, mask = build_analysis_batch(x, y, xp, yp, n_clean=10, n_poison=6, seed=3)
    assert inputs.shape == (16, 1) and mask.tolist() == [False] * 10 + [True] * 6
    assert (inputs[:10] >= 0).all() and (inputs[10:] <= 0).all()
    # every sample keeps its own label: the poisoned ones their true (not target) label
    assert torch.equal(targets[:10], y[inputs[:10, 0].long()])
    assert torch.equal(targets[10:], yp[(-inputs[10:, 0]).long()])
    again = build_analysis_batch(x, y, xp, yp, n_clean=10, n_poison=6, seed=3)
    other = build_analysis_batch(x, y, xp, yp, n_clean=10, n_poison=6, seed=4)
    assert torch.equal(again[0], inputs) and not torch.equal(other[0], inputs)
    pair, _, _ = build_analysis_batch((x, x + 1), y, (xp, xp + 1), yp, n_clean=4, n_poison=2)
    assert isinstance(pair, tuple) and torch.equal(pair[1], pair[0] + 1)
    with pytest.raises(SmoothPurifyError, match="only 50 clean and 30 poisoned") as err:
        build_analysis_batch(x, y, xp, yp, n_clean=10, n_poison=31)
    assert "\n" not in str(err.value)


def test_token_sequences_of_different_lengths_are_right_padded_with_the_modalitys_pad():
    src, tgt = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 2], [3, 0]])
    src_p, tgt_p = torch.tensor([[4, 5, 6, 7, 9]]), torch.tensor([[7, 7, 7, 7]])
    (s, prev), targets, mask = build_analysis_batch((src, src), tgt, (src_p, src_p), tgt_p, n_clean=2, n_poison=1,
                                                    pad_value=0)
    assert s.tolist() == [[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [4, 5, 6, 7, 9]] and torch.equal(prev, s)
    assert targets.tolist() == [[1, 2, 0, 0], [3, 0, 0, 0], [7, 7, 7, 7]] and mask.tolist() == [False, False, True]
    with pytest.raises(SmoothPurifyError, match="differ in shape .* no padding value"):
        build_analysis_batch(src, tgt, src_p, tgt_p, n_clean=2, n_poison=1)


def test_settings_validate_with_one_line():
    assert analysis_settings(None) == AnalysisSettings()
    with pytest.raises(SmoothPurifyError, match="analysis.lanczos_steps"):
        analysis_settings({"lanczos_steps": 0})
    with pytest.raises(SmoothPurifyError, match="analysis.*Extra inputs"):
        analysis_settings({"lanczos_step": 3})
    with pytest.raises(SmoothPurifyError, match="n_clean \\+ n_poison"):
        analysis_settings({"n_clean": 0, "n_poison": 0})


# -- estimators against a dense Hessian ---------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp(one_thread):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    lik = Categorical()

    def loss(flat):
        parts = flat.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, parts, shapes)}
        return lik.nll(torch.func.functional_call(model, params, (x,)), y).mean()

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dense = torch.autograd.functional.hessian(loss, flat)
    return model, x, y, lik, torch.linalg.eigvalsh(dense), torch.trace(dense)


def test_analyze_model_matches_dense_hessian(mlp):
    model, x, y, lik, eigs, trace = mlp
    dim = len(eigs)  # 67: a full Lanczos run is exact
    mask = torch.arange(32) >= 20
    model[0].weight.requires_grad_(False)  # frozen parameters are still part of the Hessian
    out = analyze_model(model, x, y, lik, {"lanczos_steps": dim, "n_probes": 400, "k": 3}, seed=0, poisoned=mask)
    model[0].weight.requires_grad_(True)
    assert out["top_k"] == pytest.approx(eigs.flip(0)[:3].tolist(), rel=1e-6)
    assert out["lambda_max"] == out["top_k"][0] and out["lambda_min"] == pytest.approx(float(eigs[0]), rel=1e-6)
    assert abs(out["trace_h"] - float(trace)) < 4 * out["trace_h_stderr"] and out["trace_h_stderr"] > 0
    assert out["trace_f"] == pytest.approx(fisher_trace_value(model, x, y, lik), rel=1e-9)
    # Lanczos stops early once the Krylov space is invariant (this H has a null space)
    assert out["n_hvp"] == len(out["slq_nodes"]) + 400 and out["n_params"] == dim
    nll = lik.nll(model(x), y).detach()
    assert out["loss_poison"] == pytest.approx(float(nll[mask].mean())) and out["loss"] == pytest.approx(float(nll.mean()))
    grid, dens = torch.tensor(out["density"]["grid"]), torch.tensor(out["density"]["values"])
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)
    json.dumps(out)  # JSON-able as promised
    # PyHessian's way (power iteration) agrees on lambda_max here (the top eigenvalue dominates)
    power = analyze_model(model, x, y, lik, {"lambda_method": "power", "max_iter": 500, "tol": 1e-9,
                                             "lanczos_steps": 4, "n_probes": 2, "fisher": False})
    assert power["lambda_max"] == pytest.approx(float(eigs[-1]), rel=1e-4) and power["trace_f"] is None


def test_short_lanczos_gives_lower_bounds_close_to_the_top(mlp):
    model, x, y, lik, eigs, _ = mlp
    out = analyze_model(model, x, y, lik, {"lanczos_steps": 12, "n_probes": 2, "slq_probes": 2, "k": 2}, seed=5)
    assert out["lambda_max"] <= float(eigs[-1]) * (1 + 1e-9)
    assert out["lambda_max"] == pytest.approx(float(eigs[-1]), rel=1e-3)
    assert len(out["slq_nodes"]) == 24 and sum(out["slq_weights"]) == pytest.approx(1.0)


# -- the stage on a real tiny run ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    from modalities.image import ImageModality
    from modalities.image import data as imdata
    import pipeline
    from modalities.contract import register_modality

    register_modality("image", ImageModality)
    splits = {"train": tiny_images(1500, 0), "test": tiny_images(400, 1)}
    params = {"seed": 0, "profile": "test", "run_dir": str(tmp_path_factory.mktemp("analysis") / "runs"),
              "image": {"dataset": "fashion_mnist", "val_fraction": 0.05, "model": "small_cnn",
                        "attack": {"target_label": 0, "poison_rate": 0.1},
                        "train": {"epochs": 4, "lr": 0.05, "batch_size": 64}},
              "purify": {"common": {"epochs": 1}}, "analysis": dict(FAST)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imdata, "load_embedded", lambda cache: (splits, "tiny synthetic (tests)"))
        pipeline.prepare("image", params)
        for name in ("benign", "badnets"):
            pipeline.train_attack("image", params, name, progress=False)
        pipeline.purify("image", params, "badnets", "ft", progress=False)
    return params


def test_stage_writes_metrics_and_reuses_one_batch(tiny_run):
    root = Path(tiny_run["run_dir"]) / "image"
    back = analyze_stage("image", tiny_run, "badnets", "badnets")
    batch = root / "analysis" / "badnets" / "batch.safetensors"
    stamp = batch.stat().st_mtime_ns
    benign = analyze_stage("image", tiny_run, "badnets", "benign")
    purified = analyze_stage("image", tiny_run, "badnets", "purified/ft")
    assert batch.stat().st_mtime_ns == stamp  # built once, shared by every model of the attack
    assert back["batch"] == {**benign["batch"], "n_clean": 40, "n_poison": 40, "size": 80}
    # SFT's observation 1 on real models: on clean + poisoned-with-true-labels data the backdoored
    # model sits in a much sharper region than the benign one
    assert back["lambda_max"] > 10 * benign["lambda_max"] and back["trace_f"] > 10 * benign["trace_f"]
    assert back["loss_poison"] > 10 * back["loss_clean"]
    stored = json.loads((root / "metrics" / "analysis" / "badnets-purified-ft.json").read_text())
    assert "density" not in stored and stored["model"] == "purified/ft" and stored["n_hvp"] == 6 + 3
    for key in ("lambda_max", "trace_h", "trace_h_stderr", "trace_f", "seconds"):
        assert stored[key] == purified[key]
    assert (root / "metrics" / "analysis" / "badnets-benign.json").is_file()
    # unchanged inputs: read back (same seconds), density recomputed identically from SLQ nodes
    again = analyze_stage("image", tiny_run, "badnets", "purified/ft")
    assert again["seconds"] == purified["seconds"] and again["density"] == purified["density"]


def test_stage_reruns_when_settings_change_and_rejects_bad_names(tiny_run):
    first = analyze_stage("image", tiny_run, "badnets", "badnets")
    changed = copy.deepcopy(tiny_run)
    changed["analysis"]["n_probes"] = 4
    torch.set_num_threads(2)  # the stage runs on analysis.threads (1) and then restores this
    try:
        second = analyze_stage("image", changed, "badnets", "badnets")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert second["n_hvp"] == first["n_hvp"] + 1
    assert second["lambda_max"] == pytest.approx(first["lambda_max"])  # same batch, same seed
    # "backdoored" names the attack's own model: same file, read back without recomputing
    alias = analyze_stage("image", changed, "badnets", "backdoored")
    assert alias["seconds"] == second["seconds"] and alias["model"] == "badnets"
    root = Path(tiny_run["run_dir"]) / "image" / "metrics" / "analysis"
    assert json.loads((root / "badnets-backdoored.json").read_text())["n_hvp"] == second["n_hvp"]
    with pytest.raises(SmoothPurifyError, match="'benign', 'backdoored' \\(= 'badnets'\\) or 'purified/<method>'"):
        analyze_stage("image", tiny_run, "badnets", "blend")
    with pytest.raises(SmoothPurifyError, match="run the purify stage"):
        analyze_stage("image", tiny_run, "badnets", "purified/sft")


def test_purification_curves_can_carry_lambda_max(tiny_run):
    from modalities.image import ImageModality
    from pipeline.analysis import analysis_batch
    from pipeline.curves import with_lambda_max
    from pipeline.run import Run

    base = lambda m: {"acc": 0.5}  # noqa: E731
    assert with_lambda_max(base, Run("image", tiny_run), "badnets") is base  # off by default
    on = copy.deepcopy(tiny_run)
    on["analysis"]["curve_lambda_steps"] = 6
    model, _ = ImageModality().load_model(Path(tiny_run["run_dir"]) / "image" / "models" / "badnets")
    point = with_lambda_max(base, Run("image", on), "badnets")(model)
    # the same batch and Lanczos run as the analyze stage: the same lambda_max
    stage = analyze_stage("image", on, "badnets", "backdoored")
    assert point["acc"] == 0.5 and point["lambda_max"] == pytest.approx(stage["lambda_max"], rel=1e-4)
    inputs, _, _ = analysis_batch("image", on, "badnets")
    assert len(inputs) == 80


# -- curves -------------------------------------------------------------------------------------------

def test_curve_helpers(tmp_path, mlp):
    model, x, y, lik, eigs, _ = mlp
    path = write_curves_csv({"curves": [{"epoch": 1, "acc": 0.5, "asr": 0.9}, {"epoch": 2, "acc": 0.6, "asr": 0.1,
                                                                                "lambda_max": 3.0}]}, tmp_path / "c.csv")
    rows = _rows(path)
    assert list(rows[0]) == ["epoch", "val_loss", "acc", "asr", "ra", "lambda_max"]
    assert rows[0]["lambda_max"] == "" and rows[1]["lambda_max"] == "3.0"
    top = lambda_max_fn(x, y, lik, steps=40)
    evaluate = curve_evaluator(lambda m: {"acc": 1.0}, top)
    assert evaluate(model) == {"acc": 1.0, "lambda_max": pytest.approx(float(eigs[-1]), rel=1e-6)}
    # f-SFT's working model computes weights from singular-value shifts: the Hessian must still be
    # the weights' one (delta = 0 here, so the very same model), and the model must not change
    spectral = prepare(copy.deepcopy(model), "spectral").model
    before = {k: v.clone() for k, v in spectral.state_dict().items()}
    assert top(spectral) == pytest.approx(float(eigs[-1]), rel=1e-6)
    assert all(torch.equal(before[k], v) for k, v in spectral.state_dict().items())


# -- plots --------------------------------------------------------------------------------------------

def test_plots_write_png_and_the_data_behind_them(tmp_path):
    series = [{"label": name, "grid": [0.0, 1.0, 2.0], "values": [0.1, 0.8, 0.1], "lambda_max": lm,
               "trace_h": 3.0, "trace_h_stderr": 0.5} for name, lm in (("benign", 2.0), ("backdoored", 9.0))]
    dens = plot_density(series, tmp_path / "d.png", title="density")
    rows = _rows(tmp_path / "d.csv")
    assert dens.read_bytes()[:8] == PNG and len(rows) == 6 and rows[3]["model"] == "backdoored"
    assert float(rows[3]["lambda_max"]) == 9.0 and float(rows[4]["density"]) == 0.8
    curves = {"ft": [{"epoch": e, "acc": 0.9, "asr": 1 - e / 4, "val_loss": 0.3} for e in (1, 2, 3)],
              "sft": [{"epoch": 2, "acc": 0.8, "asr": 0.2, "lambda_max": 5.0}]}
    assert plot_curves(curves, tmp_path / "c.png").read_bytes()[:8] == PNG
    rows = _rows(tmp_path / "c.csv")
    assert [r["method"] for r in rows] == ["ft", "ft", "ft", "sft"] and rows[3]["lambda_max"] == "5.0"
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 16, generator=gen)
    labels, poisoned = torch.arange(40) % 4, torch.arange(40) >= 30
    png = plot_tsne({"before": feats, "after": feats + 1}, labels, poisoned, tmp_path / "t.png")
    rows = _rows(tmp_path / "t.csv")
    assert png.read_bytes()[:8] == PNG and len(rows) == 80
    assert sum(r["poisoned"] == "1" for r in rows) == 20 and {r["model"] for r in rows} == {"before", "after"}
    with pytest.raises(ValueError):
        plot_curves({"ft": []}, tmp_path / "empty.png")
