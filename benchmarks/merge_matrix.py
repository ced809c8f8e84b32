"""Merge per-attack purification-matrix JSONs (one file per row, e.g. from gpu_smoke_sweep.sh) into one.

    python benchmarks/merge_matrix.py ROWS_DIR OUT_STEM     # writes OUT_STEM.json and OUT_STEM.md

Cells merge column by column: a row file with some methods of an attack adds them to (or replaces them
in) OUT_STEM's row, whose other methods stay; OUT_STEM's existing store is the starting point.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.purification_matrix import to_markdown  # noqa: E402


def merge(rows_dir: Path, base: dict | None = None) -> dict:
    store: dict = base or {"rows": {}, "meta": {"settings": {}}}
    for path in sorted(rows_dir.glob("*.json")):
        part = json.loads(path.read_text())
        settings = {**store["meta"].get("settings", {}), **part["meta"].get("settings", {})}
        store["meta"] = {**store["meta"], **part["meta"], "settings": settings}
        for attack, cells in part["rows"].items():
            store["rows"].setdefault(attack, {}).update(cells)
    if not store["rows"]:
        raise SystemExit(f"no rows under {rows_dir}")
    return store


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    out = Path(argv[1])
    base = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else None
    store = merge(Path(argv[0]), base)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(store, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(to_markdown(store))
    print(to_markdown(store).split("Settings per method")[0])


if __name__ == "__main__":
    main(sys.argv[1:])
