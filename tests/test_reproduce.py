"""The reproduce flow (flows/reproduce.py): every modality's pipeline, then the papers' tables."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from smoothpurify import SmoothPurifyError


def _params_file(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**params, "profiles": {params["profile"]: {}}}))
    return path


@pytest.mark.pipeline
def test_reproduce_runs_the_modality_flow_then_writes_the_tables_from_its_cells(tiny_params, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    from prefect.testing.utilities import prefect_test_harness

    from flows.reproduce import reproduce_flow

    params = {**tiny_params, "purify": {**tiny_params["purify"], "methods": ["ngf"]}, "analysis": {"enabled": False}}
    path = _params_file(tmp_path, params)
    with prefect_test_harness():
        out = reproduce_flow(params_path=str(path), modalities=["image"])
    assert out["modalities"] == ["image"]
    cell = json.loads((Path(params["run_dir"]) / "image" / "metrics" / "cells" / "badnets-ngf.json").read_text())
    table = (Path(params["run_dir"]) / "tables" / "ngf-i-cifar10.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| badnets | cls-ngf (ours: ngf)"))
    assert f"| {cell['asr']:.2f} | 1.86 |" in row   # ours beside the paper's 1.86 % ASR
    index = Path(out["tables"]).read_text()
    assert "SFT Table 1" in index and "(multilabel: no run folder)" in index


def test_a_failed_modality_is_reported_after_the_others_and_the_tables(tiny_params, tmp_path, monkeypatch):
    import flows.reproduce as reproduce

    ran = []

    class Flow:
        def with_options(self, **_):
            return self

        def __call__(self, modality, **_):
            ran.append(modality)
            if modality == "image":
                raise RuntimeError("out of memory")

    monkeypatch.setattr(reproduce, "available_modalities", lambda: ["image", "extra"])
    monkeypatch.setattr(reproduce, "backdoor_flow", Flow())
    path = _params_file(tmp_path, tiny_params)
    with pytest.raises(SmoothPurifyError, match="1 modality run\\(s\\) failed: image"):
        reproduce.reproduce_flow.fn(params_path=str(path))
    assert ran == ["image", "extra"]                          # the papers' order, then the others
    assert (Path(tiny_params["run_dir"]) / "tables" / "README.md").is_file()


def test_an_unknown_modality_is_one_error_line(capsys):
    from flows.reproduce import main

    assert main(["--modalities", "image,sonar"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown modality sonar; choose from: ")
