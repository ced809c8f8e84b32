"""params.yaml: one file holds every experiment parameter; a profile overrides parts of it.

``profile: smoke`` (CPU, minutes) is the default; ``profiles.<name>`` is deep-merged over the
top-level sections. DVC tracks the same file, so ``dvc params diff`` shows what changed.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from smoothpurify import SmoothPurifyError

DEFAULT_PARAMS = Path("params.yaml")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_params(path: Path | str = DEFAULT_PARAMS, profile: str | None = None,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read params.yaml and apply ``profiles[profile]`` (default: the file's ``profile`` key)."""
    path = Path(path)
    if not path.is_file():
        raise SmoothPurifyError(f"parameters file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SmoothPurifyError(f"{path} is not valid YAML ({err})") from None
    profiles = raw.pop("profiles", {}) or {}
    name = profile or raw.get("profile", "smoke")
    if name not in profiles:
        raise SmoothPurifyError(f"unknown profile {name!r} in {path}; defined: {', '.join(profiles) or 'none'}")
    params = deep_merge(raw, profiles[name])
    params["profile"] = name
    params = deep_merge(params, overrides or {})
    _check_top_level(params, path)
    return params


def _check_top_level(params: dict[str, Any], path: Path) -> None:
    """The keys every stage reads, checked once here (a modality checks its own section)."""
    seed = params.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SmoothPurifyError(f"{path}: seed must be a non-negative integer, got {seed!r}")
    if not isinstance(params.get("run_dir", "runs"), str) or not params.get("run_dir", "runs"):
        raise SmoothPurifyError(f"{path}: run_dir must be a folder name, got {params.get('run_dir')!r}")
    for section in ("purify", "analysis", "report"):
        if not isinstance(params.get(section) or {}, dict):
            raise SmoothPurifyError(f"{path}: {section} must be a mapping, got {params.get(section)!r}")


def file_hash(path: Path) -> str | None:
    """A short hash of a file's bytes (None when absent): fingerprints of content, never of timings."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able configuration, used to skip stages whose inputs are unchanged."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
