"""Result tables: collected from the run folder's metrics, printed with rich, saved as JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from smoothpurify.checkpoint import write_json
from pipeline.run import Run


def attack_rows(run: Run, attacks: list[str]) -> list[dict[str, Any]]:
    """One row per attack: benign and backdoored ACC / ASR / RA (percent)."""
    rows = []
    for attack in attacks:
        rec = run.read_json(run.attack_metrics(attack))
        if rec is None:
            continue
        row: dict[str, Any] = {"attack": attack}
        for kind in ("benign", "backdoored"):
            for metric in ("acc", "asr", "ra"):
                value = rec.get(kind, {}).get(metric)
                row[f"{kind}_{metric}"] = None if value is None else round(100 * value, 2)
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], title: str, columns: list[tuple[str, str]] | None = None,
                console: Console | None = None) -> None:
    if not rows:
        return
    columns = columns or [(k, k) for k in rows[0]]
    table = Table(title=title)
    for _, header in columns:
        table.add_column(header, justify="left" if header == columns[0][1] else "right")
    for row in rows:
        table.add_row(*("-" if row.get(k) is None else
                        (f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k])) for k, _ in columns))
    if console is None:
        # Piped output (logs, CI) would be cut to 80 columns; a wide table is easier to read than a cut one.
        console = Console() if Console().is_terminal else Console(width=200)
    console.print(table)


ATTACK_COLUMNS = [("attack", "attack"), ("benign_acc", "benign ACC %"), ("benign_asr", "benign ASR %"),
                  ("backdoored_acc", "backdoored ACC %"), ("backdoored_asr", "backdoored ASR %"),
                  ("backdoored_ra", "backdoored RA %")]


def save_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    write_json(path, rows)

