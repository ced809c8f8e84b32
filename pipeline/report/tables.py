"""Result tables: rows collected from the run folder's records, in the modality's own metrics, each
purified row judged (``pipeline.report.verdict``); printed with rich, saved as JSON, rendered by the
report."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from smoothpurify.checkpoint import write_json
from smoothpurify.metrics import Metric
from smoothpurify.smoothness import RUNTIME_KEYS, analysis_settings
from pipeline.report.verdict import REMOVED, AttackVerdict, VerdictThresholds, attack_verdicts
from pipeline.run import BENIGN, Run

REFERENCE = "no defense"  # the undefended model's row
SMOOTHNESS_COLUMNS = [("attack", "attack"), ("model", "model"), ("lambda_max", "lambda_max"), ("trace_h", "Tr(H)"),
                      ("trace_h_stderr", "Tr(H) stderr"), ("trace_f", "Tr(F)"), ("loss", "batch loss"),
                      ("n_hvp", "HVPs"), ("seconds", "seconds")]


def method_columns(metrics: tuple[Metric, ...]) -> list[tuple[str, str]]:
    """The purification table's columns for a modality's metrics."""
    return [("attack", "attack"), ("method", "method"), ("verdict", "verdict"), *((m.key, m.label) for m in metrics),
            ("seconds", "seconds")]


def attack_columns(metrics: tuple[Metric, ...]) -> list[tuple[str, str]]:
    """The backdoored-models table: each metric of the benign and of the backdoored model."""
    return [("attack", "attack"), *((f"{kind}_{m.key}", f"{kind} {m.label}")
                                    for kind in ("benign", "backdoored") for m in metrics)]


def percent(value: Any) -> float | None:
    return None if value is None else round(100.0 * float(value), 2)


def shown(metric: Metric, value: Any) -> float | None:
    """A stored metric value in its display units (percent where the metric says so)."""
    return percent(value) if metric.percent else (None if value is None else round(float(value), 4))


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    return str(value)


def seconds_of(record: dict[str, Any], part: str = "total") -> float | None:
    sec = record.get("seconds")
    if not isinstance(sec, dict):  # a defense may report one number: that is the total
        sec = {"total": sec}
    value = sec.get(part)
    return None if value is None else round(float(value), 2)


def attack_rows(run: Run, attacks: list[str]) -> list[dict[str, Any]]:
    """One row per attack: each metric of the benign and the backdoored model, in display units."""
    rows = []
    for attack in attacks:
        rec = run.read_json(run.attack_metrics(attack))
        if rec is None:
            continue
        rows.append({"attack": attack, **{f"{kind}_{m.key}": shown(m, (rec.get(kind) or {}).get(m.key))
                                          for kind in ("benign", "backdoored") for m in run.modality.metrics}})
    return rows


def best_rules(metrics: tuple[Metric, ...]) -> dict[str, Callable[[list[float]], float]]:
    """Which direction is better per column, from the metrics' own directions (and time: less)."""
    return {**{m.key: (max if m.higher_is_better else min) for m in metrics}, "seconds": min}


def _mark_best(group: list[dict[str, Any]], rules: dict[str, Callable[[list[float]], float]]) -> None:
    # Only methods that removed the backdoor compete: the highest ACC of a model that still obeys its
    # trigger is no achievement. Where none removed it, nothing is marked.
    contenders = [r for r in group if r.get("verdict") == REMOVED]
    for key, pick in rules.items():
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

    Keys: attack, method, method_name, verdict (``pipeline.report.verdict``), one per metric (display
    units), setup_s, tuning_s, seconds (total), best (the keys that are best among the methods that
    removed the backdoor; ties all marked), reference, diverged (shown as "<name> (diverged)").
    With ``mark_best`` the numbers become strings and the best ones rich markup (bold green, *),
    ready for ``print_table(rows, title, method_columns(metrics))``.
    """
    rows, _ = rows_and_verdicts(modality, params, attacks, methods)
    if not mark_best:
        return rows
    keys = [*(m.key for m in Run(modality, params).modality.metrics), "seconds"]
    return [{**r, **{k: (f"[bold green]{fmt(r[k])} *[/]" if k in r["best"] else fmt(r[k])) for k in keys}}
            for r in rows]


def rows_and_verdicts(modality: str, params: dict[str, Any], attacks: list[str],
                      methods: list[str]) -> tuple[list[dict[str, Any]], list[AttackVerdict]]:
    """The method rows (see :func:`method_rows`) and the per-attack verdicts they support."""
    run = Run(modality, params)
    metrics = run.modality.metrics
    values = lambda rec: {m.key: shown(m, rec.get(m.key)) for m in metrics}  # noqa: E731
    rows: list[dict[str, Any]] = []
    groups = []
    for attack in attacks:
        records = [(m, run.read_json(run.purify_metrics(attack, m))) for m in methods]
        records = [(m, r) for m, r in records if r]
        # Every method starts from the same backdoored model and test set, so any "before" serves.
        before = next((r["before"] for _, r in records if r.get("before")), None) \
            or (run.read_json(run.attack_metrics(attack)) or {}).get("backdoored")
        group = []
        if before:
            group.append({"attack": attack, "method": REFERENCE, "method_name": REFERENCE, "verdict": "",
                          **values(before), "setup_s": None, "tuning_s": None, "seconds": None, "best": [],
                          "reference": True})
        for method, rec in records:
            group.append({"attack": attack, "method": f"{method} (diverged)" if rec.get("diverged") else method,
                          "method_name": method, "verdict": "", **values(rec.get("after") or {}),
                          "setup_s": seconds_of(rec, "setup"), "tuning_s": seconds_of(rec, "tuning"),
                          "seconds": seconds_of(rec), "best": [], "reference": False,
                          "diverged": bool(rec.get("diverged"))})
        groups.append(group)
        rows += group
    verdicts = attack_verdicts(rows, metrics, VerdictThresholds.from_params(params))
    for group in groups:
        _mark_best(group, best_rules(metrics))
    return rows, verdicts


def model_role(name: str, attack: str) -> str:
    if name == BENIGN:
        return "benign (reference)"
    if name == attack:
        return "backdoored (before)"
    return f"{name.split('/', 1)[1]} (after)"


def model_names(attack: str, methods: list[str]) -> list[str]:
    return [BENIGN, attack, *(f"purified/{m}" for m in methods)]


def smoothness_rows(modality: str, params: dict[str, Any], attacks: list[str],
                    methods: list[str]) -> list[dict[str, Any]]:
    """One row per analysed model: benign (reference), backdoored (before), each purified (after).

    ``trace_h_resolved`` is False when Tr(H) lies within two standard errors of zero: the estimate
    does not resolve its sign, and the report says so instead of printing a bare negative number.
    """
    run = Run(modality, params)
    # Numbers from other estimator settings (an older run) do not compare: say so in the row.
    current = analysis_settings(params.get("analysis")).model_dump(exclude=set(RUNTIME_KEYS))
    rows = []
    for attack in attacks:
        for name in model_names(attack, methods):
            rec = run.read_json(run.analysis_record(attack, name))
            if rec:
                stale = {k: v for k, v in (rec.get("settings") or {}).items() if k not in RUNTIME_KEYS} != current
                trace, err = rec.get("trace_h"), rec.get("trace_h_stderr")
                resolved = trace is None or err is None or abs(trace) > 2 * err
                rows.append({"attack": attack, "model": model_role(name, attack) + (" [other settings]" if stale else ""),
                             "name": name, "stale": stale, "trace_h_resolved": resolved,
                             **{k: rec.get(k) for k, _ in SMOOTHNESS_COLUMNS[2:]}})
    return rows


def print_table(rows: list[dict[str, Any]], title: str, columns: list[tuple[str, str]] | None = None,
                console: Console | None = None) -> None:
    if not rows:
        return
    columns = columns or [(k, k) for k in rows[0]]
    table = Table(title=title)
    for _, header in columns:
        table.add_column(header, justify="left" if header in (columns[0][1], "method", "verdict") else "right")
    for row in rows:
        table.add_row(*("-" if row.get(k) is None else
                        (f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k])) for k, _ in columns))
    if console is None:
        # Piped output (logs, CI) would be cut to 80 columns; a wide table is easier to read than a cut one.
        console = Console() if Console().is_terminal else Console(width=200)
    console.print(table)


def save_rows(path: Path, rows: Any) -> None:
    write_json(path, rows)
