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


def _plain_tensors(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    # safetensors refuses shared storage; contiguous clones also drop views into larger tensors.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_checkpoint(path: Path, model_or_state: nn.Module | dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``path`` (safetensors) and ``path.json`` (metadata: architecture, classes, data, attack, seed)."""
    tensors = _plain_tensors(model_or_state)
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_json(sidecar_path(path), meta)


def save_bundle(path: Path, model_or_state: nn.Module | dict[str, torch.Tensor], meta: dict[str, Any],
                record: dict[str, Any]) -> None:
    """Commit a checkpoint, its sidecar (``.json``) and its record (``.record.json``) as one unit.

    All three are written to temporary files first (a crash leaves the previous set, never half of
    one), then renamed into place while holding an exclusive lock on ``.<name>.lock``, so two runs
    writing to the same path cannot pair one run's weights with the other's record.
    """
    import fcntl  # noqa: PLC0415 - POSIX only, like the rest of the toolchain

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _plain_tensors(model_or_state)
    targets = [path, sidecar_path(path), path.with_suffix(".record.json")]
    writers = [lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
               lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"),
               lambda p: p.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")]
    temps: list[Path] = []
    try:
        for target, write in zip(targets, writers):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            temps.append(Path(tmp))
            write(Path(tmp))
            os.chmod(tmp, 0o644)
        with open(path.parent / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for tmp, target in zip(temps, targets):
                os.replace(tmp, target)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; refuse pickles and corrupt files with one clear line.

    The file is parsed as safetensors first: its 8-byte header length may start with any byte
    (0x80 included, about one file in 256), so the first bytes alone never decide. Only a file that
    is not valid safetensors and starts like a pickle or a torch.save zip is called one.
    """
    path = Path(path)
    if not path.is_file():
        raise SmoothPurifyError(f"checkpoint not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head.startswith(_PICKLE_MAGIC):
            raise SmoothPurifyError(
                f"{path} is a pickle/torch.save file; refusing to unpickle an untrusted checkpoint. Convert it "
                "where you trust it: safetensors.torch.save_file(model.state_dict(), 'model.safetensors')") from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SmoothPurifyError(f"{path} is not a valid safetensors file ({reason})") from None


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
