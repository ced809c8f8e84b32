"""Helpers the benchmark scripts share: ``--set`` parsing and reuse of the demo's dataset cache."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def parse_set(items: list[str]) -> dict[str, Any]:
    """``key=value`` (value parsed as YAML; ``a.b.c=v`` sets a nested key) -> options."""
    out: dict[str, Any] = {}
    for item in items:
        lhs, eq, value = item.partition("=")
        name, *keys = lhs.split(".")
        if not eq or not name:
            raise SystemExit(f"--set wants key=value or name.key=value, got {item!r}")
        if not keys:
            out[name] = yaml.safe_load(value)
            continue
        node = out.setdefault(name, {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(value)
    return out


def link_cache(run_dir: Path) -> None:
    """Reuse the demo's extracted dataset instead of fetching the Debian package again."""
    demo, bench = ROOT / "runs" / "image" / "cache", run_dir / "image" / "cache"
    if demo.is_dir() and not bench.exists():
        bench.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(demo.resolve(), bench)


def code_state() -> str:
    """The commit a benchmark process runs, with ``+dirty`` when tracked code (``*.py``) or params.yaml
    differ from it: a row measured while the working tree was being edited is then visible in its
    record. Results, dvc.lock and docs are left out: the benchmarks themselves rewrite them."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "*.py", "params.yaml")
    except OSError:
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
