"""The run report: ``runs/<m>/report.md`` and ``runs/<m>/report.html`` from what the stages wrote.

Everything comes from the run folder (``data/data.json``, ``models/*/model.json``,
``metrics/<attack>.json``, ``metrics/purify/*.json``, ``metrics/analysis/*.json``) plus the
figures drawn here into ``figures/``. The document is built once as a list of sections of simple
blocks and rendered twice, so the Markdown and the HTML cannot disagree. The HTML is one
self-contained file (inline CSS, images as base64 data URIs) that can be mailed or archived.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Callable

import yaml

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import atomic_write
from smoothpurify.metrics import BACKDOOR_METRICS, Metric
from smoothpurify.smoothness import RUNTIME_KEYS, analysis_settings, density_from_record
from pipeline.run import BENIGN, Run

__all__ = ["METHOD_COLUMNS", "SMOOTHNESS_COLUMNS", "method_rows", "smoothness_rows", "make_figures", "write_report"]

REFERENCE = "no defense"  # the undefended model's row


def method_columns(metrics: tuple[Metric, ...]) -> list[tuple[str, str]]:
    """The purification table's columns for a modality's metrics."""
    return [("attack", "attack"), ("method", "method"), *((m.key, m.label) for m in metrics), ("seconds", "seconds")]


METHOD_COLUMNS = method_columns(BACKDOOR_METRICS)
SMOOTHNESS_COLUMNS = [("attack", "attack"), ("model", "model"), ("lambda_max", "lambda_max"), ("trace_h", "Tr(H)"),
                      ("trace_h_stderr", "Tr(H) stderr"), ("trace_f", "Tr(F)"), ("loss", "batch loss"),
                      ("n_hvp", "HVPs"), ("seconds", "seconds")]


def best_rules(metrics: tuple[Metric, ...]) -> dict[str, Callable[[list[float]], float]]:
    """Which direction is better per column, from the metrics' own directions (and time: less)."""
    return {**{m.key: (max if m.higher_is_better else min) for m in metrics}, "seconds": min}


def _best_sentence(metrics: tuple[Metric, ...]) -> str:
    low = [m.label.replace(" %", "") for m in metrics if not m.higher_is_better]
    high = [m.label.replace(" %", "") for m in metrics if m.higher_is_better]
    parts = ([f"lowest {' and '.join(low)}"] if low else []) + ([f"highest {' and '.join(high)}"] if high else [])
    return "Best per attack in bold: " + ", ".join(parts + ["lowest seconds"]) + "."


def _pct(value: Any) -> float | None:
    return None if value is None else round(100.0 * float(value), 2)


def _seconds(record: dict[str, Any], part: str = "total") -> float | None:
    sec = record.get("seconds")
    if not isinstance(sec, dict):  # a defense may report one number: that is the total
        sec = {"total": sec}
    value = sec.get(part)
    return None if value is None else round(float(value), 2)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    return str(value)


# -- tables ------------------------------------------------------------------------------------------

def _mark_best(group: list[dict[str, Any]], rules: dict[str, Callable[[list[float]], float]]) -> None:
    # The undefended reference row never competes.
    for key, pick in rules.items():
        contenders = [r for r in group if not r.get("reference") and not r.get("diverged")]
        values = [r[key] for r in contenders if r.get(key) is not None]
        # A lone method is not "best" at anything, and nor is anyone in a column where all tie.
        if len(values) > 1 and len(set(values)) > 1:
            best = pick(values)
            for r in contenders:
                if r.get(key) == best:
                    r["best"].append(key)


def method_rows(modality: str, params: dict[str, Any], attacks: list[str], methods: list[str],
                mark_best: bool = False) -> list[dict[str, Any]]:
    """Per attack: the undefended reference row, then one row per purified method.

    Keys: attack, method, asr, acc, ra (percent), setup_s, tuning_s, seconds (total), best (the keys that are best
    within the attack: lowest ASR, highest ACC and RA, lowest seconds; ties all marked; never a diverged run),
    reference, diverged (the clean validation loss blew up: method shown as "<name> (diverged)").
    With ``mark_best`` the numbers become strings and the best ones rich markup (bold green, *),
    ready for ``pipeline.report.tables.print_table(rows, title, METHOD_COLUMNS)``.
    """
    run = Run(modality, params)
    metrics = run.modality.metrics
    values = lambda rec: {m.key: _pct(rec.get(m.key)) if m.percent else rec.get(m.key) for m in metrics}  # noqa: E731
    rows: list[dict[str, Any]] = []
    for attack in attacks:
        records = [(m, run.read_json(run.purify_metrics(attack, m))) for m in methods]
        records = [(m, r) for m, r in records if r]
        # Every method starts from the same backdoored model and test set, so any "before" serves.
        before = next((r["before"] for _, r in records if r.get("before")), None) \
            or (run.read_json(run.attack_metrics(attack)) or {}).get("backdoored")
        group = []
        if before:
            group.append({"attack": attack, "method": REFERENCE, **values(before),
                          "setup_s": None, "tuning_s": None, "seconds": None, "best": [], "reference": True})
        for method, rec in records:
            group.append({"attack": attack, "method": f"{method} (diverged)" if rec.get("diverged") else method,
                          **values(rec.get("after") or {}),
                          "setup_s": _seconds(rec, "setup"), "tuning_s": _seconds(rec, "tuning"),
                          "seconds": _seconds(rec), "best": [], "reference": False,
                          "diverged": bool(rec.get("diverged"))})
        _mark_best(group, best_rules(metrics))
        rows += group
    if not mark_best:
        return rows
    return [{**r, **{k: (f"[bold green]{_fmt(r[k])} *[/]" if k in r["best"] else _fmt(r[k]))
                     for k in [*(m.key for m in metrics), "seconds"]}} for r in rows]


def _model_role(name: str, attack: str) -> str:
    if name == BENIGN:
        return "benign (reference)"
    if name == attack:
        return "backdoored (before)"
    return f"{name.split('/', 1)[1]} (after)"


def _model_names(attack: str, methods: list[str]) -> list[str]:
    return [BENIGN, attack, *(f"purified/{m}" for m in methods)]


def smoothness_rows(modality: str, params: dict[str, Any], attacks: list[str],
                    methods: list[str]) -> list[dict[str, Any]]:
    """One row per analysed model: benign (reference), backdoored (before), each purified (after)."""
    run = Run(modality, params)
    # Numbers from other estimator settings (an older run) do not compare: say so in the row.
    current = analysis_settings(params.get("analysis")).model_dump(exclude=set(RUNTIME_KEYS))
    rows = []
    for attack in attacks:
        for name in _model_names(attack, methods):
            rec = run.read_json(run.analysis_record(attack, name))
            if rec:
                stale = {k: v for k, v in (rec.get("settings") or {}).items() if k not in RUNTIME_KEYS} != current
                rows.append({"attack": attack, "model": _model_role(name, attack) + (" [other settings]" if stale else ""),
                             "name": name, "stale": stale, **{k: rec.get(k) for k, _ in SMOOTHNESS_COLUMNS[2:]}})
    return rows


# -- figures -----------------------------------------------------------------------------------------

def _metrics_of(run: Run, attack: str, name: str) -> dict[str, Any]:
    if name.startswith("purified/"):
        return (run.read_json(run.purify_metrics(attack, name.split("/", 1)[1])) or {}).get("after") or {}
    rec = run.read_json(run.attack_metrics(attack)) or {}
    return rec.get("benign" if name == BENIGN else "backdoored") or {}


def _tsne(modality: str, params: dict[str, Any], attack: str, names: list[str], path: Path) -> Path | None:
    from smoothpurify.model import penultimate_features
    from pipeline.analysis import analysis_batch
    from pipeline.report.plots import plot_tsne

    run = Run(modality, params)
    dirs = {n: run.analysed_model_dir(attack, n) for n in names}
    dirs = {n: d for n, d in dirs.items() if (d / "model.safetensors").is_file()}
    if not dirs:
        return None
    mod = run.modality
    inputs, targets, mask = analysis_batch(modality, params, attack)
    panels = {_model_role(n, attack): penultimate_features(mod.load_model(d)[0].eval(), inputs) for n, d in dirs.items()}
    return plot_tsne(panels, targets, mask, path, title=f"{attack}: penultimate features of the analysis batch",
                     seed=int(params.get("seed", 0)))


def make_figures(modality: str, params: dict[str, Any], attacks: list[str], methods: list[str],
                 tsne: bool = True) -> dict[str, list[tuple[Path, str]]]:
    """Draw what the run folder supports, per attack: density, curves, t-SNE -> ``[(png, caption)]``.

    Files go to ``figures/<kind>/<attack>.png`` (+ ``.csv``): one folder per kind, so each can be a
    ``dvc plots`` entry with its own x/y fields (DVC shows the PNGs as images, the CSVs as charts).
    """
    from pipeline.report.plots import plot_curves, plot_density

    run = Run(modality, params)
    out = run.figures_dir
    figures: dict[str, list[tuple[Path, str]]] = {}
    for attack in attacks:
        figs = figures.setdefault(attack, [])
        series = []
        for name in _model_names(attack, methods):
            rec = run.read_json(run.analysis_record(attack, name))
            if rec and rec.get("slq_nodes"):
                m = _metrics_of(run, attack, name)
                label = _model_role(name, attack) + (f"\nACC {_fmt(_pct(m['acc']))}%, ASR {_fmt(_pct(m['asr']))}%"
                                                     if "acc" in m and "asr" in m else "")
                series.append({"label": label, **density_from_record(rec), **{k: rec.get(k) for k in
                                                                             ("lambda_max", "trace_h", "trace_h_stderr")}})
        if series:
            figs.append((plot_density(series, out / "density" / f"{attack}.png", title=f"{attack}: Hessian eigenvalue density"),
                         f"{attack}: eigenvalue density of the loss Hessian on the fixed analysis batch "
                         "(clean + poisoned inputs with true labels); lambda_max and Tr(H) in the legends."))
        curves = {m: rec["curves"] for m in methods
                  if (rec := run.read_json(run.purify_metrics(attack, m))) and rec.get("curves")}
        if curves:
            figs.append((plot_curves(curves, out / "curves" / f"{attack}.png", title=f"{attack}: purification curves"),
                         f"{attack}: ASR, ACC (test set, reporting only), lambda_max and validation loss per epoch."))
        if tsne:
            png = _tsne(modality, params, attack, [attack, *(f"purified/{m}" for m in methods)], out / "tsne" / f"{attack}.png")
            if png is not None:
                figs.append((png, f"{attack}: t-SNE of penultimate features before and after purification; "
                                  "black crosses are poisoned inputs, colours the true classes."))
    return figures


# -- the document ------------------------------------------------------------------------------------

Cell = tuple[str, bool]  # text, best


def _table(columns: list[tuple[str, str]], rows: list[dict[str, Any]]) -> tuple:
    body = [[(_fmt(r.get(k)), k in r.get("best", [])) for k, _ in columns] for r in rows]
    return ("table", [h for _, h in columns], body)


def _attack_settings(run: Run, attacks: list[str]) -> tuple:
    rows = []
    for attack in attacks:
        meta = run.read_json(run.model_json(attack)) or {}
        desc = meta.get("attack") or {}
        settings = ", ".join(f"{k}={v}" for k, v in desc.items() if k not in ("name", "seed"))
        rec = run.read_json(run.attack_metrics(attack)) or {}
        b, d = rec.get("benign") or {}, rec.get("backdoored") or {}
        rows.append({"attack": attack, "settings": settings or "-", "poisoned": meta.get("poisoned_samples"),
                     "b_acc": _pct(b.get("acc")), "b_asr": _pct(b.get("asr")), "d_acc": _pct(d.get("acc")),
                     "d_asr": _pct(d.get("asr")), "d_ra": _pct(d.get("ra"))})
    cols = [("attack", "attack"), ("settings", "settings"), ("poisoned", "poisoned train samples"),
            ("b_acc", "benign ACC %"), ("b_asr", "benign ASR %"), ("d_acc", "backdoored ACC %"),
            ("d_asr", "backdoored ASR %"), ("d_ra", "backdoored RA %")]
    return _table(cols, rows)


def _sections(modality: str, params: dict[str, Any], attacks: list[str], methods: list[str],
              figures: dict[str, list[tuple[Path, str]]]) -> list[tuple[str, list[tuple]]]:
    run = Run(modality, params)
    data = run.read_json(run.data_json) or {}
    arch = next(((run.read_json(run.model_json(n)) or {}).get("architecture")
                 for n in [BENIGN, *attacks] if run.model_json(n).is_file()), None)
    sizes = data.get("sizes") or {}
    data_blocks = [("p", f"Source: {data.get('source', 'not prepared')}"),
                   ("p", f"Dataset {data.get('dataset', '-')}, {data.get('num_classes', '-')} classes, input shape "
                         f"{data.get('input_shape', '-')}; splits: " + ", ".join(f"{k} {v}" for k, v in sizes.items())
                         + f" (clean validation = {data.get('val_fraction', '-')} of train, the defender's only data)."),
                   ("p", f"Model: {arch or '-'}; seed {params.get('seed', 0)}; profile {params.get('profile', '-')}.")]
    s = analysis_settings(params.get("analysis"))
    smooth = [("p", f"Fixed batch per attack: {s.n_clean} clean test samples + {s.n_poison} poisoned test inputs "
                    "with their true labels (SFT A.2.2). lambda_max from "
                    f"{'Lanczos Ritz values' if s.lambda_method == 'lanczos' else 'power iteration'}, "
                    f"Tr(H) by Hutchinson ({s.n_probes} Rademacher probes, mean +- stderr), Tr(F) exact; "
                    f"density by SLQ ({s.slq_probes} x {s.lanczos_steps} Lanczos steps).")]
    srows = smoothness_rows(modality, params, attacks, methods)
    smooth.append(_table(SMOOTHNESS_COLUMNS, srows) if srows else ("p", "No model analysed yet (run the analyze stage)."))
    mrows = method_rows(modality, params, attacks, methods)
    metrics = run.modality.metrics
    results = [("p", "After purification, on the test set (reporting only; nothing was tuned on it). "
                     + _best_sentence(metrics)),
               _table(method_columns(metrics), mrows) if mrows else ("p", "No purification results yet.")]
    figs = [("img", png, caption) for attack in attacks for png, caption in figures.get(attack, [])]
    configs = {m: rec.get("config") for a in attacks for m in methods
               if (rec := run.read_json(run.purify_metrics(a, m))) and rec.get("config")}
    plain = json.loads(json.dumps(params, default=str))
    param_blocks = [("p", "params.yaml as used (profile merged):"),
                    ("code", yaml.safe_dump(plain, sort_keys=False, default_flow_style=False, allow_unicode=True)),
                    ("p", "Resolved analysis settings and purification methods:"),
                    ("code", yaml.safe_dump({"analysis": s.model_dump(), "methods": configs}, sort_keys=False))]
    return [("Data source", data_blocks), ("Attack settings", [_attack_settings(run, attacks)]),
            ("Purification results", results), ("Smoothness", smooth),
            ("Figures", figs or [("p", "No figures (nothing analysed or purified yet).")]),
            ("Parameters", param_blocks)]


def _md(title: str, sections: list[tuple[str, list[tuple]]], base: Path) -> str:
    out = [f"# {title}", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""]
        for block in blocks:
            if block[0] == "p":
                out += [block[1], ""]
            elif block[0] == "table":
                cell = lambda c: (f"**{c[0]}**" if c[1] else c[0]).replace("|", "\\|")  # noqa: E731
                out += ["| " + " | ".join(block[1]) + " |", "|" + "---|" * len(block[1])]
                out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block[2]] + [""]
            elif block[0] == "img":
                out += [f"![{block[2]}]({Path(block[1]).relative_to(base).as_posix()})", "", f"*{block[2]}*", ""]
            elif block[0] == "code":
                out += ["```yaml", block[1].rstrip("\n"), "```", ""]
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}td.best{background:#e6f4ea}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.9em;color:#555}"""


def _html(title: str, sections: list[tuple[str, list[tuple]]]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    for heading, blocks in sections:
        slug = heading.lower().replace(" ", "-")
        out.append(f'<section id="{slug}"><h2>{e(heading)}</h2>')
        for block in blocks:
            if block[0] == "p":
                out.append(f"<p>{e(block[1])}</p>")
            elif block[0] == "table":
                out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in block[1]) + "</tr></thead><tbody>")
                out += ["<tr>" + "".join(f'<td class="best"><strong>{e(t)}</strong></td>' if best else f"<td>{e(t)}</td>"
                                         for t, best in row) + "</tr>" for row in block[2]]
                out.append("</tbody></table>")
            elif block[0] == "img":
                data = base64.b64encode(Path(block[1]).read_bytes()).decode("ascii")
                out.append(f'<figure><img alt="{e(block[2])}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{e(block[2])}</figcaption></figure>")
            elif block[0] == "code":
                out.append(f'<pre><code class="language-yaml">{e(block[1])}</code></pre>')
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(modality: str, params: dict[str, Any], attacks: list[str], methods: list[str],
                 figures: bool = True) -> tuple[Path, Path]:
    """Draw the figures and write ``runs/<m>/report.md`` and ``runs/<m>/report.html``.

    Refuses (one error line, the old report kept) when none of the attacks has a result yet: an
    empty report must never replace a good one.
    """
    run = Run(modality, params)
    if not (any(run.attack_metrics(a).is_file() for a in attacks)
            or any(run.purify_metrics(a, m).is_file() for a in attacks for m in methods)):
        raise SmoothPurifyError(f"nothing to report: no results for attacks {', '.join(attacks) or '(none)'} under "
                                f"{run.root}; run the flow (or the evaluate / purify stages) first")
    figs = make_figures(modality, params, attacks, methods) if figures else {}
    title = f"smoothpurify report: {modality} (profile {params.get('profile', '-')})"
    sections = _sections(modality, params, attacks, methods, figs)
    md_path, html_path = run.report_files()
    atomic_write(md_path, lambda p: p.write_text(_md(title, sections, run.root) + "\n", encoding="utf-8"))
    atomic_write(html_path, lambda p: p.write_text(_html(title, sections) + "\n", encoding="utf-8"))
    return md_path, html_path
