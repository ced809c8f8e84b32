"""The run report: ``runs/<m>/report.md`` and ``runs/<m>/report.html`` from what the stages wrote.

It opens with the answer: a verdict per attack in plain words (``pipeline.report.verdict``), with the
thresholds it used, and the figure of it. Then the tables, the smoothness analysis, the figures (each
with a caption that says what to see) and the parameters of what ran. Everything comes from the run
folder (``data/data.json``, ``models/*/model.json``, ``metrics/<attack>.json``,
``metrics/purify/*.json``, ``metrics/analysis/*.json``) plus the figures drawn into ``figures/``. The
document is built once as a list of sections of simple blocks and rendered twice, so the Markdown
and the HTML cannot disagree. The HTML is one self-contained file (inline CSS, images as base64
data URIs) that can be mailed or archived.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import yaml

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import atomic_write
from smoothpurify.metrics import metric_with_role
from smoothpurify.smoothness import analysis_settings
from pipeline.report.figures import Figures, make_figures
from pipeline.report.tables import (SMOOTHNESS_COLUMNS, fmt, method_columns, rows_and_verdicts,
                                    smoothness_rows)
from pipeline.report.verdict import AttackVerdict, VerdictThresholds, overall_sentence
from pipeline.run import BENIGN, Run

__all__ = ["write_report", "params_as_run"]

# -- the document ------------------------------------------------------------------------------------

Cell = tuple[str, bool]  # text, best


def _table(columns: list[tuple[str, str]], rows: list[dict[str, Any]]) -> tuple:
    body = [[(fmt(r.get(k)), k in r.get("best", [])) for k, _ in columns] for r in rows]
    return ("table", [h for _, h in columns], body)


def _attack_settings(run: Run, attacks: list[str]) -> tuple:
    from pipeline.report.tables import attack_columns, attack_rows

    by_attack = {r["attack"]: r for r in attack_rows(run, attacks)}
    rows = []
    for attack in attacks:
        meta = run.read_json(run.model_json(attack)) or {}
        desc = meta.get("attack") or {}
        settings = ", ".join(f"{k}={v}" for k, v in desc.items() if k not in ("name", "seed"))
        rows.append({**by_attack.get(attack, {"attack": attack}), "settings": settings or "-",
                     "poisoned": meta.get("poisoned_samples")})
    cols = attack_columns(run.modality.metrics)
    return _table([cols[0], ("settings", "settings"), ("poisoned", "poisoned train samples"), *cols[1:]], rows)


def params_as_run(params: dict[str, Any], modality: str, attacks: list[str], methods: list[str]) -> dict[str, Any]:
    """The params that shaped this report's results: this modality's section with the attacks that
    ran, the purification settings of the methods that ran; profiles (already merged) and other
    modalities' sections left out."""
    from modalities.contract import available_modalities

    plain = json.loads(json.dumps(params, default=str))
    others = set(available_modalities()) - {modality}
    out = {k: v for k, v in plain.items() if k not in others and k != "profiles"}
    section = dict(plain.get(modality) or {})
    section["attacks"] = list(attacks)
    attack = dict(section.get("attack") or {})
    if isinstance(attack.get("variants"), dict):
        attack["variants"] = {k: v for k, v in attack["variants"].items() if k in attacks}
    if isinstance(attack.get("options"), dict):
        bases = set(attacks) | {v.get("attack") for v in (attack.get("variants") or {}).values() if isinstance(v, dict)}
        attack["options"] = {k: v for k, v in attack["options"].items() if k in bases}
    if attack:
        section["attack"] = {k: v for k, v in attack.items() if v not in ({}, None)}
    out[modality] = section
    purify = dict(plain.get("purify") or {})
    purify["methods"] = list(methods)
    if isinstance(purify.get("overrides"), dict):
        purify["overrides"] = {k: v for k, v in purify["overrides"].items() if k in methods}
    out["purify"] = purify
    return out


def _smoothness_table(rows: list[dict[str, Any]]) -> list[tuple]:
    shown = []
    for r in rows:
        trace = fmt(r.get("trace_h"))
        if not r.get("trace_h_resolved", True):
            trace += " (n.r.)"
        shown.append({**r, "trace_h": trace})
    blocks = [_table(SMOOTHNESS_COLUMNS, shown)]
    if any(not r.get("trace_h_resolved", True) for r in rows):
        blocks.append(("p", "n.r. = not resolved: Tr(H) lies within two standard errors of zero, so this "
                            "estimate cannot tell its sign (a negative value is not evidence of negative "
                            "curvature). More Hutchinson probes (analysis.n_probes) narrow the error bar."))
    return blocks


def _verdict_blocks(run: Run, verdicts: list[AttackVerdict], figures: Figures) -> list[tuple]:
    metrics = run.modality.metrics
    a, c = metric_with_role(metrics, "attack"), metric_with_role(metrics, "clean")
    blocks: list[tuple] = [("p", overall_sentence(verdicts))]
    blocks += [("li", v.sentence()) for v in verdicts]
    if a is not None and c is not None:
        blocks.append(("note", VerdictThresholds.from_params(run.params).sentence(a, c)
                       + " All numbers on the test set, for reporting only: no method, setting or "
                         "stopping point was chosen with it."))
    if figures.verdict:
        blocks.append(("img", *figures.verdict))
    return blocks


def _measured_asr(run: Run, attack: str, name: str) -> float | None:
    """Test ASR of the backdoored model or of ``purified/<method>``, from their records (None: absent)."""
    path = run.attack_metrics(attack) if name == "backdoored" else run.purify_metrics(attack, name.split("/", 1)[1])
    rec = run.read_json(path) if path.is_file() else None
    if rec is None:
        return None
    return (rec.get("backdoored") or {}).get("asr") if name == "backdoored" else (rec.get("after") or {}).get("asr")


def _scan_blocks(run: Run, attacks: list[str], methods: list[str]) -> list[tuple]:
    """The scan of each backdoored and purified model (clean data only) beside its measured test ASR,
    and the synthesised triggers of every flagged model; empty when nothing was scanned."""
    from pipeline.scan import removal, scan_from_record

    rows, images = [], []
    for attack in attacks:
        received = None
        for name, label in [("backdoored", "backdoored"), *((f"purified/{m}", m) for m in methods)]:
            rec = run.read_json(run.scan_record(attack, name)) if run.scan_record(attack, name).is_file() else None
            if not rec or not rec.get("enabled") or rec.get("skipped"):
                continue
            asr = _measured_asr(run, attack, name)
            removed = ("-", False)
            if name == "backdoored":
                received = rec
            elif received is not None:
                judged = removal(scan_from_record(received), scan_from_record(rec))
                removed = (f"{judged.max_anomaly:.2f} (class {judged.top}){', flagged' if judged.flagged else ''}",
                           judged.flagged)
            rows.append([(attack, False), (label, False), (f"{rec['max_anomaly']:.2f} ({rec.get('family', '-')})", False),
                         ("-" if rec.get("suspected") is None else str(rec["suspected"]), False),
                         ("yes" if rec["flagged"] else "no", bool(rec["flagged"])), removed,
                         ("-" if asr is None else f"{100 * asr:.1f} %", False)])
            if rec["flagged"]:
                images += [("img", f, f"{attack}, {label}: synthesised triggers ({Path(f).stem.split('-', 1)[1]})")
                           for f in rec.get("figures", []) if Path(f).is_file()]
    if not rows:
        return []
    return [("p", "Each model scanned from the clean validation data alone (no poisoned data): for every class "
                  "the smallest trigger that sends the other classes' inputs to it; a class whose trigger is an "
                  "outlier (anomaly index above 2) is flagged as the suspected target. 'Removed': the backdoored "
                  "model's scan judged against the purified model's (README, 'What the purification removed'): "
                  "the class the purification made hardest to reach, flagged over the 5 % null threshold. Test "
                  "ASR beside it, for reporting only."),
            ("table", ["attack", "model", "largest anomaly (family)", "suspected class", "flagged",
                       "removed (received vs this)", "test ASR"], rows),
            *images]


def _sections(modality: str, params: dict[str, Any], attacks: list[str], methods: list[str],
              rows: list[dict[str, Any]], verdicts: list[AttackVerdict],
              figures: Figures) -> list[tuple[str, list[tuple]]]:
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
    smooth += _smoothness_table(srows) if srows else [("p", "No model analysed yet (run the analyze stage).")]
    metrics = run.modality.metrics
    results = [("p", "After purification, on the test set (reporting only; nothing was tuned on it). Bold: the "
                     "best value per column among the methods that removed the backdoor; nothing is bold where "
                     "no method removed it."),
               _table(method_columns(metrics), rows) if rows else ("p", "No purification results yet.")]
    figs = [("img", png, caption) for attack in attacks for png, caption in figures.per_attack.get(attack, [])]
    configs = {m: rec.get("config") for a in attacks for m in methods
               if (rec := run.read_json(run.purify_metrics(a, m))) and rec.get("config")}
    param_blocks = [("p", f"The parameters of what ran ({len(attacks)} attack(s), {len(methods)} method(s)), "
                          "from params.yaml with the profile merged:"),
                    ("code", yaml.safe_dump(params_as_run(params, modality, attacks, methods), sort_keys=False,
                                            default_flow_style=False, allow_unicode=True)),
                    ("p", "Resolved analysis settings and purification methods:"),
                    ("code", yaml.safe_dump({"analysis": s.model_dump(), "methods": configs}, sort_keys=False))]
    sections = [("Verdict", _verdict_blocks(run, verdicts, figures)), ("Purification results", results)]
    scans = _scan_blocks(run, attacks, methods)
    if scans:
        sections.append(("Backdoor scan", scans))
    return sections + [("Attack settings", [_attack_settings(run, attacks)]),
            ("Data source", data_blocks), ("Smoothness", smooth),
            ("Figures", figs or [("p", "No figures (nothing analysed or purified yet).")]),
            ("Parameters", param_blocks)]


def _md(title: str, sections: list[tuple[str, list[tuple]]], base: Path) -> str:
    out = [f"# {title}", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""]
        for block in blocks:
            if block[0] == "p":
                out += [block[1], ""]
            elif block[0] == "li":
                out += [f"- {block[1]}"]
            elif block[0] == "note":
                out += ["", f"> {block[1]}", ""]
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
th{background:#f3f3f3}td:first-child,td:nth-child(2),th:first-child,th:nth-child(2){text-align:left}td.best{background:#e6f4ea}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.9em;color:#555}p.verdict{font-size:1.1em;border-left:4px solid #2e86c1;padding-left:.6em}
p.note{font-size:.9em;color:#555}"""


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
            elif block[0] == "li":
                out.append(f'<p class="verdict">{e(block[1])}</p>')
            elif block[0] == "note":
                out.append(f'<p class="note">{e(block[1])}</p>')
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
    rows, verdicts = rows_and_verdicts(modality, params, attacks, methods)
    figs = make_figures(modality, params, attacks, methods, verdicts, rows) if figures else Figures()
    title = f"smoothpurify report: {modality} (profile {params.get('profile', '-')})"
    sections = _sections(modality, params, attacks, methods, rows, verdicts, figs)
    md_path, html_path = run.report_files()
    atomic_write(md_path, lambda p: p.write_text(_md(title, sections, run.root) + "\n", encoding="utf-8"))
    atomic_write(html_path, lambda p: p.write_text(_html(title, sections) + "\n", encoding="utf-8"))
    return md_path, html_path
