"""Checkpoints: safetensors + a JSON sidecar. Never unpickle (vendor checkpoints are untrusted)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from smoothpurify import SmoothPurifyError

# A pickle starts with the PROTO opcode; torch.save's zip format starts with "PK".
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename into place, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(Path(path), lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"))


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(path: Path, model_or_state: nn.Module | dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``path`` (safetensors) and ``path.json`` (metadata: architecture, classes, data, attack, seed)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    # safetensors refuses shared storage; contiguous clones also drop views into larger tensors.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_json(sidecar_path(path), meta)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; refuse pickles and corrupt files with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise SmoothPurifyError(f"checkpoint not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(_PICKLE_MAGIC):
        raise SmoothPurifyError(
            f"{path} is a pickle/torch.save file; refusing to unpickle an untrusted checkpoint. "
            "Convert it where you trust it: safetensors.torch.save_file(model.state_dict(), 'model.safetensors')")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise SmoothPurifyError(f"{path} is not a valid safetensors file ({err})") from None


def load_meta(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise SmoothPurifyError(f"metadata sidecar {side} is not valid JSON ({err})") from None


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Load ``state`` strictly, explaining any mismatch with the architecture in one line."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shape (e.g. {wrong[0]})")
        raise SmoothPurifyError(f"{source} does not match the architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model
