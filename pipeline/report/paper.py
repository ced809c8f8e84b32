"""The papers' tables with our numbers beside theirs: ``python -m tasks tables`` (DVC stage ``tables``).

The published cells live in ``paper_tables.yaml`` (transcribed from the SFT and NGF papers, one entry per
table and dataset). For every table whose modality has a run folder, each paper row (attack x method) is
put beside our cell of the same attack and method: the metric cells a run writes
(``runs/<modality>/metrics/cells/<attack>-<model>.json``, display units) and, for ``lambda_max``, the
smoothness analysis records. ``none`` is the undefended (backdoored) model. A table may map a paper name
to ours (``ours: {sft-theta: sft}``), and an attack (``ours_attacks``) where the paper leaves it unnamed. Our methods the paper did not report are added as rows with the
paper's cells empty; paper attacks we did not run are named under the table, not drawn.

Our datasets are the embedded defaults (or what ``params.yaml`` points at), not the papers': every table
says which data and model each side used, so "beside" never reads as "the same experiment".
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib import rc_context
from matplotlib.figure import Figure

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import atomic_write
from pipeline.report.plots import MAX_WIDTH_IN, STYLE, finish_grid, grid_shape, write_csv
from pipeline.report.tables import fmt
from pipeline.run import BACKDOORED, Run

PAPER_TABLES = Path(__file__).with_name("paper_tables.yaml")
UNDEFENDED = "none"
ALL_ATTACKS = "all"  # a paper cell averaged over every attack (a runtime)
LABELS = {"asr": "ASR %", "acc": "ACC %", "ra": "RA %", "map": "mAP %", "ct_bleu": "CT BLEU", "at_bleu": "AT BLEU",
          "lambda_max": "lambda_max", "seconds": "seconds"}
# The metric a table's figure draws: the attack's, when the table has it.
DRAWN = ("asr", "at_bleu", "lambda_max")


@dataclass
class PaperTable:
    id: str
    paper: str
    table: str
    caption: str
    modality: str
    dataset: str
    metrics: list[str]
    cells: list[dict[str, Any]]
    model: str = ""
    ours: dict[str, str] = field(default_factory=dict)
    ours_attacks: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def attacks(self) -> list[str]:
        return list(dict.fromkeys(c["attack"] for c in self.cells))

    def methods(self) -> list[str]:
        return list(dict.fromkeys(c["method"] for c in self.cells))

    def cell(self, attack: str, method: str) -> dict[str, Any] | None:
        return next((c for c in self.cells if c["attack"] == attack and c["method"] == method), None)

    def our_name(self, method: str) -> str:
        return self.ours.get(method, method)


def load_paper_tables(path: Path = PAPER_TABLES) -> list[PaperTable]:
    """The transcribed tables; a malformed file is one error naming the entry."""
    try:
        entries = (yaml.safe_load(Path(path).read_text()) or {}).get("tables") or []
    except (OSError, yaml.YAMLError) as err:
        raise SmoothPurifyError(f"cannot read the paper tables {path}: {err}") from None
    tables = []
    for i, entry in enumerate(entries):
        try:
            known = {k: entry[k] for k in PaperTable.__dataclass_fields__ if k in entry}
            table = PaperTable(**known)
            table.table = str(table.table)
            for cell in table.cells:
                if "attack" not in cell or "method" not in cell:
                    raise KeyError("attack/method of a cell")
        except (TypeError, KeyError) as err:
            name = entry.get("id", "?") if isinstance(entry, dict) else repr(entry)
            raise SmoothPurifyError(f"paper table #{i} ({name}) in {path} is malformed: {err}") from None
        tables.append(table)
    ids = [t.id for t in tables]
    if len(set(ids)) != len(ids):
        raise SmoothPurifyError(f"paper table ids repeat in {path}: {sorted({i for i in ids if ids.count(i) > 1})}")
    return tables


def _model_name(method: str) -> str:
    return BACKDOORED if method == UNDEFENDED else method


class RunSource:
    """Our cells from a run folder (the DVC / flow pipeline)."""

    label = "run"

    def __init__(self, run: Run):
        self.run = run

    def has(self, attack: str) -> bool:
        return self.run.read_json(self.run.cell_metrics(attack, BACKDOORED)) is not None

    def cell(self, attack: str, method: str, metrics: list[str]) -> dict[str, Any] | None:
        """Our values of ``metrics`` for the attack's model ``method`` (``none``: undefended), or None."""
        run, name = self.run, _model_name(method)
        values = run.read_json(run.cell_metrics(attack, name))
        if values is None:
            return None
        out = {m: values.get(m) for m in metrics}
        if "lambda_max" in metrics:
            analysed = name if method == UNDEFENDED else f"purified-{method}"
            out["lambda_max"] = (run.read_json(run.root / "metrics" / "analysis" / f"{attack}-{analysed}.json")
                                 or {}).get("lambda_max")
        if "seconds" in metrics and method != UNDEFENDED:
            out["seconds"] = _total_seconds((run.read_json(run.purify_metrics(attack, method)) or {}).get("seconds"))
        return out


class MatrixSource:
    """Our cells from a purification matrix (``benchmarks/purification_matrix.py``'s JSON: attack ->
    method -> fractions), for the attacks the run did not train; no smoothness analysis there."""

    label = "matrix"

    def __init__(self, path: Path):
        try:
            self.rows = json.loads(Path(path).read_text()).get("rows") or {}
        except (OSError, json.JSONDecodeError):
            self.rows = {}

    def has(self, attack: str) -> bool:
        return UNDEFENDED in self.rows.get(attack, {})

    def cell(self, attack: str, method: str, metrics: list[str]) -> dict[str, Any] | None:
        values = self.rows.get(attack, {}).get(method)
        if values is None:
            return None
        out = {m: (None if values.get(m) is None else round(100.0 * float(values[m]), 2))
               for m in metrics if m in ("asr", "acc", "ra")}
        if "seconds" in metrics and method != UNDEFENDED:
            out["seconds"] = _total_seconds(values.get("seconds"))
        return out


def _total_seconds(sec: Any) -> float | None:
    return sec.get("total") if isinstance(sec, dict) else sec


def compare(table: PaperTable, sources: list[Any], our_methods: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (attack, method, ``<metric>_paper``, ``<metric>_ours``, ``source``) for the attacks we ran,
    and the paper's attacks we did not run. Each attack's cells all come from the first source that
    holds its backdoored model (one model per row group)."""
    rows, not_run = [], []
    for attack in table.attacks():
        if attack == ALL_ATTACKS:
            rows += _mean_seconds_rows(table, sources[0])
            continue
        ran = table.ours_attacks.get(attack, attack)
        source = next((src for src in sources if src.has(ran)), None)
        if source is None:
            not_run.append(attack)
            continue
        shown_attack = attack if ran == attack else f"{attack} (ours: {ran})"
        paper_methods = [m for m in table.methods() if table.cell(attack, m) is not None]
        covered = {table.our_name(m) for m in paper_methods}
        extra = [m for m in our_methods if m not in covered and m != UNDEFENDED]
        for method in [*paper_methods, *extra]:
            paper = table.cell(attack, method) if method in paper_methods else None
            ours_as = table.our_name(method) if paper is not None else method
            ours = source.cell(ran, ours_as, table.metrics) or {}
            label = method if ours_as == method else f"{method} (ours: {ours_as})"
            row = {"attack": shown_attack, "method": label}
            for m in table.metrics:
                row[f"{m}_paper"] = None if paper is None else paper.get(m)
                row[f"{m}_ours"] = ours.get(m)
            row["source"] = source.label if ours else "-"
            rows.append(row)
    return rows, not_run


def _mean_seconds_rows(table: PaperTable, source: RunSource) -> list[dict[str, Any]]:
    """A runtime averaged over all attacks (SFT Table 6): ours averaged over the run's attacks."""
    attacks = [a for a in (source.run.section.get("attacks") or []) if source.has(a)]
    rows = []
    for method in table.methods():
        paper = table.cell(ALL_ATTACKS, method)
        if paper is None or method == UNDEFENDED:
            continue
        ours_as = table.our_name(method)
        seconds = [s for a in attacks if (s := (source.cell(a, ours_as, ["seconds"]) or {}).get("seconds")) is not None]
        row = {"attack": f"{ALL_ATTACKS} (mean)", "method": method if ours_as == method else f"{method} (ours: {ours_as})"}
        row.update({f"{m}_paper": paper.get(m) for m in table.metrics})
        row.update({f"{m}_ours": None for m in table.metrics})
        row["seconds_ours"] = round(sum(seconds) / len(seconds), 2) if seconds else None
        row["source"] = source.label if seconds else "-"
        rows.append(row)
    return rows


def _columns(table: PaperTable) -> list[tuple[str, str]]:
    return [("attack", "attack"), ("method", "method"),
            *((f"{m}_{side}", f"{LABELS.get(m, m)} {side}") for m in table.metrics for side in ("ours", "paper")),
            ("source", "ours from")]


def _figure(table: PaperTable, rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Per attack, the drawn metric of every method: ours solid, the paper's hatched."""
    metric = next((m for m in DRAWN if m in table.metrics), table.metrics[0] if table.metrics else None)
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    if metric is None or not attacks:
        return None
    nrows, ncols = grid_shape(len(attacks), 2)
    drawn = []
    with rc_context(STYLE):
        fig = Figure(figsize=(MAX_WIDTH_IN if ncols > 1 else 7.5, 0.6 + 3.4 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, attack in zip(axes, attacks):
            items = [r for r in rows if r["attack"] == attack]
            x = np.arange(len(items))
            ours = [np.nan if r[f"{metric}_ours"] is None else r[f"{metric}_ours"] for r in items]
            paper = [np.nan if r[f"{metric}_paper"] is None else r[f"{metric}_paper"] for r in items]
            ax.bar(x - 0.2, ours, 0.4, color="#c0392b", label=f"ours ({table.modality})")
            ax.bar(x + 0.2, paper, 0.4, color="white", edgecolor="#c0392b", hatch="//",
                   label=f"paper ({table.dataset})")
            ax.set_xticks(x, [r["method"].split(" (")[0] for r in items], rotation=30, ha="right")
            ax.set_title(attack)
            ax.set_ylabel(LABELS.get(metric, metric))
            ax.grid(axis="y", alpha=0.3)
            drawn += [(attack, r["method"], r[f"{metric}_ours"], r[f"{metric}_paper"]) for r in items]
        title = f"{table.paper.upper()} Table {table.table} ({table.dataset}): {LABELS.get(metric, metric)}"
        return finish_grid(fig, axes, len(attacks), 2, title, path,
                            ["attack", "method", f"{metric}_ours", f"{metric}_paper"], drawn)


def _markdown(table: PaperTable, run: Run, rows: list[dict[str, Any]], not_run: list[str], figure: Path | None) -> str:
    cols = _columns(table)
    # the data's name, without where it was read from
    source = str((run.read_json(run.data_json) or {}).get("source") or run.section.get("dataset")).split(" (")[0]
    ours = f"{source}, {run.section.get('model')}"
    lines = [f"## {table.paper.upper()} Table {table.table}: {table.caption}", "",
             f"Paper: {table.dataset}{', ' + table.model if table.model else ''}. "
             f"Ours: {ours}, profile {run.params.get('profile')} (different data: compare trends, not digits).", "",
             "| " + " | ".join(label for _, label in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[key]) for key, _ in cols) + " |" for r in rows]
    if not_run:
        lines += ["", f"Paper rows not run here: {', '.join(not_run)}."]
    if table.missing:
        lines += ["", "Not transcribed: " + "; ".join(table.missing) + "."]
    if figure is not None:
        lines += ["", f"![{table.id}]({figure.name})"]
    return "\n".join(lines) + "\n\n"


def write_tables(params: dict[str, Any], out_dir: Path, tables: list[PaperTable] | None = None,
                 matrices: dict[str, Path] | None = None) -> Path:
    """Each paper table with our numbers (Markdown, CSV, a figure) under ``out_dir``, and ``README.md``
    gathering them; tables of modalities without a run are listed as such. ``matrices`` (modality ->
    a purification-matrix JSON) adds the attacks a run did not train, marked ``matrix``. Returns the
    index path."""
    tables = load_paper_tables() if tables is None else tables
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list((params.get("purify") or {}).get("methods") or [])
    parts, skipped = [], []
    for table in tables:
        run = Run(table.modality, params)
        if not run.root.is_dir():
            skipped.append(f"{table.id} ({table.modality}: no run folder)")
            continue
        sources = [RunSource(run)] + ([MatrixSource(matrices[table.modality])]
                                      if table.modality in (matrices or {}) else [])
        rows, not_run = compare(table, sources, methods)
        if not rows:
            skipped.append(f"{table.id} (none of its attacks run: {', '.join(not_run)})")
            continue
        write_csv(out_dir / f"{table.id}.csv", [label for _, label in _columns(table)],
                  ([r[key] for key, _ in _columns(table)] for r in rows))
        figure = _figure(table, rows, out_dir / f"{table.id}-figure.png")  # its own CSV: what was drawn
        text = _markdown(table, run, rows, not_run, figure)
        atomic_write(out_dir / f"{table.id}.md", lambda tmp, t=text: Path(tmp).write_text(t))
        parts.append(text)
    index = ["# The papers' tables, ours beside theirs", "",
             "Written by `python -m tasks tables` (DVC stage `tables`) from the run folders and "
             "`pipeline/report/paper_tables.yaml`. `none` is the undefended model. \"ours from\": `run` = the "
             "pipeline's run folder (`dvc repro`), `matrix` = `benchmarks/results/purification_matrix.json` "
             "(the image benchmark matrix, same smoke profile, for the attacks the run did not train).", "", *parts]
    if skipped:
        index += ["## Not written", "", *(f"- {s}" for s in skipped), ""]
    readme = out_dir / "README.md"
    atomic_write(readme, lambda tmp: Path(tmp).write_text("\n".join(index)))
    return readme
