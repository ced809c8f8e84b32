from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from pipeline.report.paper import write_tables as write_paper_tables

TABLES_DIR = "tables"  # under the run folder: runs/tables
# The image benchmark matrix (benchmarks/purification_matrix.py): the six attacks of the smoke profile
MATRICES = {"image": Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "purification_matrix.json"}


@task(name="paper-tables", cache_policy=None)
def write_tables(params: dict[str, Any]) -> str:
    """The papers' tables with our numbers beside theirs, for every modality that has a run; returns the index."""
    matrices = {m: p for m, p in MATRICES.items() if p.is_file()} if params.get("profile") == "smoke" else {}
    return str(write_paper_tables(params, Path(params.get("run_dir", "runs")) / TABLES_DIR, matrices=matrices))
