"""Merge per-attack purification-matrix JSONs (one file per row, e.g. from gpu_smoke_sweep.sh) into one.

    python benchmarks/merge_matrix.py ROWS_DIR OUT_STEM     # writes OUT_STEM.json and OUT_STEM.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.purification_matrix import to_markdown  # noqa: E402


def merge(rows_dir: Path) -> dict:
    store: dict = {"rows": {}, "meta": {"settings": {}}}
    for path in sorted(rows_dir.glob("*.json")):
        part = json.loads(path.read_text())
        settings = {**store["meta"]["settings"], **part["meta"].get("settings", {})}
        store["meta"] = {**part["meta"], "settings": settings}
        store["rows"].update(part["rows"])
    if not store["rows"]:
        raise SystemExit(f"no rows under {rows_dir}")
    return store


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    store, out = merge(Path(argv[0])), Path(argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(store, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(to_markdown(store))
    print(to_markdown(store).split("Settings per method")[0])


if __name__ == "__main__":
    main(sys.argv[1:])
