"""Benchmark records say which code made each cell (a row run while the tree was edited shows it)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_common import code_state  # noqa: E402
from benchmarks.purification_matrix import to_markdown  # noqa: E402


def _store(codes: dict[str, str]) -> dict:
    meta = {"profile": "smoke", "data": "fashion-mnist", "model": "wrn16_1", "train": "10 epochs", "val_size": 600,
            "test_size": 5000, "seed": 0, "device": "CPU", "settings": {}}
    cell = {"asr": 0.02, "acc": 0.87, "ra": 0.8, "seconds": {"total": 1.0}, "diverged": False}
    return {"meta": meta, "rows": {attack: {"none": {"asr": 1.0, "acc": 0.9, "ra": 0.0},
                                            "recommended": {**cell, "code": code}} for attack, code in codes.items()}}


def test_code_state_names_the_checked_out_commit():
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    state = code_state()
    if head.returncode != 0:
        assert state.startswith("unknown")
        return
    assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", state) and state.startswith(head.stdout.strip())


def test_the_table_warns_when_cells_come_from_different_or_edited_code():
    same = to_markdown(_store({"badnets": "0123456789ab", "blend": "0123456789ab"}))
    assert "Code of the cells (commit; `+dirty`: code or params.yaml edited): 0123456789ab." in same
    assert "**" not in same.split("Code of the cells")[1].splitlines()[0]
    mixed = to_markdown(_store({"badnets": "0123456789ab", "blend": "0123456789ab+dirty"}))
    line = mixed.split("Code of the cells")[1].splitlines()[0]
    assert "0123456789ab, 0123456789ab+dirty" in line
    assert "**Cells from different code.**" in line and "**Some ran on a working tree with uncommitted edits.**" in line
