"""Checkpoints are never unpickled; bad files fail with one clear line and leave nothing behind."""
from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from modalities.image.models import create_model
from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import load_into, load_meta, load_state, save_checkpoint

MARKER = "/tmp/smoothpurify-pwned-checkpoint"


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def test_roundtrip_with_sidecar(tmp_path):
    model = create_model("small_cnn", 10, 1, 28)
    save_checkpoint(tmp_path / "m.safetensors", model, {"architecture": "small_cnn", "seed": 1})
    other = load_into(create_model("small_cnn", 10, 1, 28), load_state(tmp_path / "m.safetensors"))
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model.eval()(x), other.eval()(x))
    assert load_meta(tmp_path / "m.safetensors")["architecture"] == "small_cnn"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, writer):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    path = tmp_path / "evil.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"w": _Payload()}))
    else:
        torch.save({"w": _Payload()}, path)
    with pytest.raises(SmoothPurifyError, match="refusing to unpickle"):
        load_state(path)
    assert not os.path.exists(MARKER)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SmoothPurifyError, match="not a valid safetensors"):
        load_state(path)
    with pytest.raises(SmoothPurifyError, match="not found"):
        load_state(tmp_path / "absent.safetensors")


def test_architecture_mismatch_is_one_line(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", create_model("small_cnn", 10, 1, 28), {})
    with pytest.raises(SmoothPurifyError) as err:
        load_into(create_model("small_cnn", 5, 1, 28), load_state(tmp_path / "m.safetensors"))
    assert "wrong shape" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SmoothPurifyError, match="missing"):
        load_into(create_model("wrn16_1", 10, 1, 28), load_state(tmp_path / "m.safetensors"))


def test_failed_write_leaves_previous_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"a": torch.ones(2)}, {})
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {"a": "not a tensor"}, {})
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _safetensors_with_first_byte(path: Path, first: int) -> None:
    """A valid safetensors file whose 8-byte header length starts with ``first`` (the header is JSON
    padded with spaces, which the format allows)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    n = len(header) + ((first - len(header)) % 256)
    n += 256 * (n < len(header))
    path.write_bytes(struct.pack("<Q", n) + header.ljust(n, b" ") + struct.pack("<f", 1.5))


def test_a_valid_safetensors_file_loads_whatever_its_first_byte(tmp_path):
    for first in range(256):
        path = tmp_path / f"b{first}.safetensors"
        _safetensors_with_first_byte(path, first)
        assert path.read_bytes()[0] == first
        state = load_state(path)
        assert float(state["w"]) == 1.5, first
