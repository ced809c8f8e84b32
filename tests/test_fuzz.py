"""Fuzz suite: every bad input to the CLI, the flow entry and the loaders ends in exit code 2 and
exactly one ``error:`` line, no traceback, the inputs untouched and no new file.

Runs in-process (``pipeline.cli.main`` / ``flows.image.main``), so the whole table takes seconds.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

# Imported here, not under capsys: Prefect binds its log handlers to the stderr of its first import.
from flows.image import main
from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import load_state
from tests.conftest import tiny_images

USER_MODEL = '''
import torch.nn as nn

def build(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, num_classes))

def broken(num_classes=10):
    raise ValueError("this factory is broken")
'''


def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A valid request (user model, checkpoint, clean and test data) plus the bad files the table uses."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "mymodel.py").write_text(USER_MODEL)
    x, y = tiny_images(120, 0)
    np.savez(d / "clean.npz", x=x[:80], y=y[:80])
    np.savez(d / "test.npz", x=x[80:], y=y[80:])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "model.safetensors"))
    (d / "pickle.safetensors").write_bytes(pickle.dumps({"w": torch.zeros(1)}))
    (d / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    (d / "empty.safetensors").write_bytes(b"")
    good = (d / "model.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (d / "huge-header.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    np.save(d / "clean.npy", x[:80])
    np.savez(d / "no-y.npz", x=x[:80])
    np.savez(d / "float-y.npz", x=x[:80], y=y[:80].astype(np.float32) + 0.5)
    np.savez(d / "nhwc.npz", x=x[:80].transpose(0, 2, 3, 1).repeat(3, axis=3), y=y[:80])
    np.savez(d / "float-x.npz", x=x[:80].astype(np.float32), y=y[:80])
    np.savez(d / "one-class.npz", x=x[:80], y=np.zeros(80, dtype=np.int64))
    np.savez(d / "wide.npz", x=np.zeros((40, 1, 16, 16), np.uint8), y=y[:40])
    np.savez(d / "labels-9.npz", x=x[:80], y=y[:80])
    _png(d / "corrupt" / "0" / "a.png", x[0, 0])
    (d / "corrupt" / "1").mkdir()
    (d / "corrupt" / "1" / "b.png").write_bytes(b"not a png at all")
    (d / "noimages" / "0").mkdir(parents=True)
    (d / "noimages" / "0" / "readme.txt").write_text("no images here")
    _png(d / "mixed" / "0" / "a.png", x[0, 0])
    _png(d / "mixed" / "1" / "b.png", np.zeros((20, 20), np.uint8))
    (d / "a-file").write_text("a file, not a folder")
    (d / "outdir").mkdir()
    return d


BASE = {"--checkpoint": "model.safetensors", "--model": "mymodel.py:build", "--num-classes": "10",
        "--clean-data": "clean.npz", "--out": "purified.safetensors", "--method": "ngf", "--epochs": "1"}

# (case id, option changes (None removes the option), extra args)
CASES = [
    ("checkpoint-missing", {"--checkpoint": "nope.safetensors"}, []),
    ("checkpoint-pickle", {"--checkpoint": "pickle.safetensors"}, []),
    ("checkpoint-random-bytes", {"--checkpoint": "random.safetensors"}, []),
    ("checkpoint-empty", {"--checkpoint": "empty.safetensors"}, []),
    ("checkpoint-truncated", {"--checkpoint": "truncated.safetensors"}, []),
    ("checkpoint-huge-header", {"--checkpoint": "huge-header.safetensors"}, []),
    ("checkpoint-hostile-path", {"--checkpoint": "../../../etc/passwd\n; rm -rf /"}, []),
    ("checkpoint-long-name", {"--checkpoint": "x" * 300 + ".safetensors"}, []),
    ("out-json", {"--out": "purified.json"}, []),
    ("out-is-the-checkpoint", {"--out": "model.safetensors"}, []),
    ("out-is-a-folder", {"--out": "outdir"}, []),
    ("out-under-a-file", {"--out": "a-file/purified.safetensors"}, []),
    ("device-cuda-on-cpu-torch", {}, ["--device", "cuda"]),
    ("device-unknown", {}, ["--device", "banana"]),
    ("device-unsupported", {}, ["--device", "meta"]),
    ("clean-npy", {"--clean-data": "clean.npy"}, []),
    ("clean-missing", {"--clean-data": "nope.npz"}, []),
    ("clean-no-y", {"--clean-data": "no-y.npz"}, []),
    ("clean-float-labels", {"--clean-data": "float-y.npz"}, []),
    ("clean-nhwc", {"--clean-data": "nhwc.npz"}, []),
    ("clean-float-x", {"--clean-data": "float-x.npz"}, []),
    ("clean-one-class", {"--clean-data": "one-class.npz"}, []),
    ("clean-corrupt-image", {"--clean-data": "corrupt"}, []),
    ("clean-folder-without-images", {"--clean-data": "noimages"}, []),
    ("clean-mixed-sizes", {"--clean-data": "mixed"}, []),
    ("test-shaped-unlike-clean", {}, ["--test-data", "wide.npz"]),
    ("normalize-inf", {}, ["--normalize", "0.5,inf"]),
    ("normalize-nan", {}, ["--normalize", "nan,0.5"]),
    ("normalize-zero-std", {}, ["--normalize", "0.5,0"]),
    ("normalize-tiny-std-overflows", {}, ["--normalize", "0.5,1e-45"]),
    ("normalize-three-values-one-channel", {}, ["--normalize", "1 2 3,1 2 3"]),
    ("normalize-garbage", {}, ["--normalize", "abc"]),
    ("factory-raises", {"--model": "mymodel.py:broken"}, []),
    ("factory-not-named", {"--model": "mymodel.py"}, []),
    ("factory-file-missing", {"--model": "missing.py:build"}, []),
    ("factory-name-missing", {"--model": "mymodel.py:nope"}, []),
    ("model-unknown-name", {"--model": "no_such_net"}, []),
    ("num-classes-below-labels", {"--num-classes": "3"}, []),
    ("num-classes-unlike-model", {"--num-classes": "12"}, []),
    ("method-unknown", {"--method": "nope"}, []),
    ("epochs-for-a-defense", {"--method": "fp"}, []),
    ("epochs-zero", {"--epochs": "0"}, []),
    ("lr-negative", {}, ["--lr", "-1"]),
    ("target-label-outside", {}, ["--test-data", "test.npz", "--poisoned-data", "test.npz", "--target-label", "99"]),
    ("loss-becomes-nan", {"--method": "ft"}, ["--lr", "1e30"]),
]


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def _argv(changes: dict, extra: list[str]) -> list[str]:
    opts = {**BASE, **changes}
    return ["purify", *[t for k, v in opts.items() if v is not None for t in (k, v)], *extra]


def _expect_one_error_line(capsys, code) -> str:
    out = capsys.readouterr()
    assert code == 2, (code, out.out[-500:], out.err[-500:])
    lines = [ln for ln in out.err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err + out.out
    return lines[0]


@pytest.mark.parametrize("case, changes, extra", CASES, ids=[c[0] for c in CASES])
def test_bad_purify_request_is_one_error_line_and_changes_nothing(world, monkeypatch, capsys, case, changes, extra):
    from pipeline import cli

    monkeypatch.chdir(world)
    before = _snapshot(world)
    monkeypatch.setattr(sys, "argv", ["smoothpurify", *_argv(changes, extra)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    _expect_one_error_line(capsys, exit_info.value.code)
    assert _snapshot(world) == before, "a refused request must leave every file as it was"


def test_the_valid_request_of_the_table_runs(world, monkeypatch, capsys, tmp_path):
    """The table's base request is valid: each case fails because of its one change."""
    from pipeline import cli

    monkeypatch.chdir(world)
    monkeypatch.setattr(sys, "argv", ["smoothpurify", *_argv({"--out": str(tmp_path / "ok.safetensors")}, [])])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "ok.safetensors").is_file() and (tmp_path / "ok.record.json").is_file()


BASE_PARAMS = "profiles: {smoke: {}}\n"
PARAMS_CASES = [
    ("seed-word", "seed: zero\n"),
    ("seed-negative", "seed: -1\n"),
    ("run-dir-number", "run_dir: 5\n"),
    ("not-yaml", "seed: [unclosed\n"),
    ("unknown-profile", "profile: nope\n"),
    ("unknown-model", "image: {model: nope}\n"),
    ("zero-epochs", "image: {train: {epochs: 0}}\n"),
    ("purify-not-a-mapping", "purify: [1, 2]\n"),
    ("unknown-attack", "image: {attacks: [nope]}\n"),
    ("unknown-method", "purify: {methods: [nope]}\n"),
    ("bad-method-setting", "purify: {methods: [ft], overrides: {ft: {lr: -1}}}\n"),
    ("unknown-image-key", "image: {colour: red}\n"),
]


@pytest.mark.parametrize("case, text", PARAMS_CASES, ids=[c[0] for c in PARAMS_CASES])
def test_bad_params_stop_the_flow_before_it_starts(tmp_path, capsys, case, text):
    path = tmp_path / "params.yaml"
    path.write_text(BASE_PARAMS + text)
    before = _snapshot(tmp_path)
    code = main(["--params", str(path)])
    _expect_one_error_line(capsys, code)
    assert _snapshot(tmp_path) == before


def test_report_refuses_unknown_names_and_an_empty_report(tmp_path, monkeypatch, capsys, tiny_params):
    import yaml

    from pipeline import cli

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**tiny_params, "profiles": {"test": {}}}))
    report = Path(tiny_params["run_dir"]) / "image" / "report.md"
    report.parent.mkdir(parents=True)
    report.write_text("a good old report")
    for args in (["--methods", "nope"], ["--attacks", "nope"], []):
        monkeypatch.setattr(sys, "argv", ["smoothpurify", "report", "--params", str(path), *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        _expect_one_error_line(capsys, exit_info.value.code)
    assert report.read_text() == "a good old report"


@pytest.mark.parametrize("first", range(256))
def test_a_file_of_any_first_byte_loads_or_fails_in_one_line(tmp_path, first):
    rng = np.random.default_rng(first)
    path = tmp_path / "x.safetensors"
    path.write_bytes(bytes([first]) + rng.bytes(int(rng.integers(0, 64))))
    try:
        load_state(path)
    except SmoothPurifyError as err:
        assert "\n" not in str(err)


def test_a_read_only_folder_is_refused_before_any_work(world, monkeypatch, capsys, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; the permission check cannot be exercised")
    from pipeline import cli

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    monkeypatch.chdir(world)
    monkeypatch.setattr(sys, "argv", ["smoothpurify", *_argv({"--out": str(locked / "p.safetensors")}, [])])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    _expect_one_error_line(capsys, exit_info.value.code)
