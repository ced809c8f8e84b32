"""Which figures a run folder supports, drawn into ``figures/`` with a caption that says what to see.

Files go to ``figures/<kind>/<attack>.png`` (+ ``.csv``): one folder per kind, so each can be a
``dvc plots`` entry with its own x/y fields (DVC shows the PNGs as images, the CSVs as charts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoothpurify.smoothness import density_from_record
from smoothpurify.metrics import metric_with_role
from pipeline.report.tables import fmt, model_names, model_role, shown
from pipeline.report.verdict import AttackVerdict
from pipeline.run import BENIGN, Run

Figure = tuple[Path, str]  # png, caption


@dataclass
class Figures:
    verdict: Figure | None = None
    per_attack: dict[str, list[Figure]] = field(default_factory=dict)


def _metrics_of(run: Run, attack: str, name: str) -> dict[str, Any]:
    if name.startswith("purified/"):
        return (run.read_json(run.purify_metrics(attack, name.split("/", 1)[1])) or {}).get("after") or {}
    rec = run.read_json(run.attack_metrics(attack)) or {}
    return rec.get("benign" if name == BENIGN else "backdoored") or {}


def _verdict_figure(run: Run, verdicts: list[AttackVerdict], rows: list[dict[str, Any]]) -> Figure | None:
    from pipeline.report.plots import plot_verdict
    from pipeline.report.verdict import VerdictThresholds

    judged = [v for v in verdicts if v.methods]
    if not judged:
        return None
    a, c = judged[0].attack_metric, judged[0].clean_metric
    groups = {v.attack: [{"method": r["method_name"] if not r.get("reference") else "none",
                          "status": r.get("verdict") or "", "attack": r.get(a.key), "clean": r.get(c.key)}
                         for r in rows if r["attack"] == v.attack] for v in judged}
    removed_at = VerdictThresholds.from_params(run.params).removed_at
    png = plot_verdict(groups, run.figures_dir / "verdict.png", a.label, c.label, removed_at,
                       title="Purification at a glance")
    return png, (f"Read: red bars are {a.label} (lower is better), blue bars {c.label} (higher is better); "
                 f"\"none\" is the undefended model. A method removed the backdoor when its red bar is below the "
                 f"dashed line ({a.label} <= {removed_at:g}) and its blue bar stays near the undefended one.")


def _tsne(run: Run, attack: str, names: list[str], path: Path) -> Path | None:
    from smoothpurify.model import penultimate_features
    from pipeline.analysis import analysis_batch
    from pipeline.report.plots import plot_tsne

    dirs = {n: run.analysed_model_dir(attack, n) for n in names}
    dirs = {n: d for n, d in dirs.items() if (d / "model.safetensors").is_file()}
    if not dirs:
        return None
    mod = run.modality
    inputs, targets, mask = analysis_batch(run.modality_name, run.params, attack)
    panels = {model_role(n, attack): penultimate_features(mod.load_model(d)[0].eval(), inputs) for n, d in dirs.items()}
    return plot_tsne(panels, targets, mask, path, title=f"{attack}: penultimate features of the analysis batch",
                     seed=run.seed)


def make_figures(modality: str, params: dict[str, Any], attacks: list[str], methods: list[str],
                 verdicts: list[AttackVerdict] | None = None, rows: list[dict[str, Any]] | None = None,
                 tsne: bool = True) -> Figures:
    """Draw what the run folder supports: the verdict bars, then per attack density, curves, t-SNE."""
    from pipeline.report.plots import plot_curves, plot_density

    run = Run(modality, params)
    out = run.figures_dir
    figures = Figures(verdict=_verdict_figure(run, verdicts or [], rows or []))
    for attack in attacks:
        figs = figures.per_attack.setdefault(attack, [])
        # Optional modality hook (point clouds): a clean input beside the same input with the trigger.
        draw = getattr(run.modality, "trigger_figure", None)
        if callable(draw) and (run.model_dir(attack) / "trigger.safetensors").is_file():
            figs.append(draw(run.data_dir, run.load_trigger(attack), out / "trigger" / f"{attack}.png"))
        series = []
        for name in model_names(attack, methods):
            rec = run.read_json(run.analysis_record(attack, name))
            if rec and rec.get("slq_nodes"):
                m = _metrics_of(run, attack, name)
                shown_metrics = [k for k in (metric_with_role(run.modality.metrics, "attack"),
                                             metric_with_role(run.modality.metrics, "clean"))
                                 if k is not None and m.get(k.key) is not None]
                extra = (" (" + ", ".join(f"{k.label.replace('%', '').strip()} {fmt(shown(k, m[k.key]))}"
                                          f"{'%' if k.percent else ''}" for k in shown_metrics) + ")"
                         if shown_metrics else "")
                series.append({"label": model_role(name, attack) + extra, **density_from_record(rec),
                               **{k: rec.get(k) for k in ("lambda_max", "trace_h", "trace_h_stderr")}})
        if series:
            figs.append((plot_density(series, out / "density" / f"{attack}.png",
                                      title=f"{attack}: Hessian eigenvalue density, all models"),
                         f"{attack}: eigenvalue density of the loss Hessian on the fixed analysis batch (clean + "
                         "poisoned inputs with their true labels), one curve per model on shared axes. Read: the "
                         "SFT paper expects the backdoored model's spectrum to reach further right (larger "
                         "lambda_max) than the benign one, and a purified model to move back towards the benign "
                         "curve; whether it does here is what the figure shows."))
        curves = {m: rec["curves"] for m in methods
                  if (rec := run.read_json(run.purify_metrics(attack, m))) and rec.get("curves")}
        if curves:
            figs.append((plot_curves(curves, out / "curves" / f"{attack}.png", title=f"{attack}: purification curves"),
                         f"{attack}: test-set ASR and ACC, lambda_max and clean validation loss per epoch, one "
                         "colour per method. Read: ASR should fall towards 0 while ACC stays flat. The test "
                         "curves are for reporting only; nothing was tuned or stopped on them."))
        if tsne:
            png = _tsne(run, attack, [attack, *(f"purified/{m}" for m in methods)], out / "tsne" / f"{attack}.png")
            if png is not None:
                figs.append((png, f"{attack}: t-SNE of penultimate features, one panel per model. Read: in the "
                                  "backdoored model the poisoned inputs (black crosses) gather in one cluster, the "
                                  "target class; after a purification that works they scatter back among the "
                                  "colours of their true classes."))
    return figures

