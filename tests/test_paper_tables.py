"""The papers' tables beside ours (pipeline/report/paper.py, `python -m tasks tables`)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from smoothpurify import SmoothPurifyError
from modalities.contract import get_modality
from pipeline.report.paper import (LABELS, PAPER_TABLES, MatrixSource, PaperTable, RunSource, compare,
                                   load_paper_tables, write_tables)
from pipeline.run import Run

TABLE = PaperTable(
    id="sft-1-test", paper="sft", table="1", caption="removal", modality="image", dataset="CIFAR10",
    model="PreActResNet-18", metrics=["asr", "acc", "lambda_max"], ours={"sft-theta": "sft"},
    cells=[{"attack": "badnets", "method": "none", "asr": 100.0, "acc": 92.96},
           {"attack": "badnets", "method": "sft-theta", "asr": 1.86, "acc": 89.32},
           {"attack": "badnets", "method": "anp", "asr": 6.87, "acc": 86.92},
           {"attack": "lira", "method": "none", "asr": 99.2, "acc": 92.0}])


def _cell(root: Path, name: str, values: dict) -> None:
    path = root / "metrics" / "cells" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))


@pytest.fixture
def run_dir(tmp_path):
    root = tmp_path / "runs" / "image"
    _cell(root, "badnets-backdoored", {"asr": 99.0, "acc": 89.5})
    _cell(root, "badnets-sft", {"asr": 40.0, "acc": 88.0})
    _cell(root, "badnets-recommended", {"asr": 1.0, "acc": 86.9})
    analysis = root / "metrics" / "analysis"
    analysis.mkdir(parents=True)
    (analysis / "badnets-backdoored.json").write_text(json.dumps({"lambda_max": 321.5}))
    (analysis / "badnets-purified-sft.json").write_text(json.dumps({"lambda_max": 12.25}))
    (root / "data").mkdir()
    (root / "data" / "data.json").write_text(json.dumps({"source": "fashion-mnist"}))
    return {"run_dir": str(tmp_path / "runs"), "profile": "smoke", "image": {"model": "wrn16_1"},
            "purify": {"methods": ["recommended", "sft"]}}


def test_rows_put_our_cell_beside_the_papers_by_name_alias_and_undefended(run_dir):
    rows, not_run = compare(TABLE, [RunSource(Run("image", run_dir))], ["recommended", "sft"])
    by = {r["method"]: r for r in rows}
    assert not_run == ["lira"]
    assert list(by) == ["none", "sft-theta (ours: sft)", "anp", "recommended"]
    assert (by["none"]["asr_ours"], by["none"]["asr_paper"], by["none"]["lambda_max_ours"]) == (99.0, 100.0, 321.5)
    theta = by["sft-theta (ours: sft)"]
    assert (theta["asr_ours"], theta["acc_paper"], theta["lambda_max_ours"]) == (40.0, 89.32, 12.25)
    assert by["anp"]["asr_ours"] is None and by["anp"]["asr_paper"] == 6.87   # not run by us
    assert by["recommended"]["asr_paper"] is None and by["recommended"]["acc_ours"] == 86.9


def test_write_tables_writes_markdown_csv_figure_and_names_what_it_skipped(run_dir, tmp_path):
    video = PaperTable(id="sft-3-ucf", paper="sft", table="3", caption="video", modality="video",
                       dataset="UCF-101", metrics=["asr", "acc"],
                       cells=[{"attack": "clean-label", "method": "none", "asr": 81.3, "acc": 75.6}])
    out = tmp_path / "tables"
    index = write_tables(run_dir, out, [TABLE, video])
    text = index.read_text()
    assert "SFT Table 1" in text and "Paper rows not run here: lira." in text
    assert "sft-3-ucf (video: no run folder)" in text
    assert (out / "sft-1-test-figure.png").stat().st_size > 1000
    with open(out / "sft-1-test.csv") as fh:
        table = list(csv.reader(fh))
    assert table[0][:4] == ["attack", "method", "ASR % ours", "ASR % paper"] and table[0][-1] == "ours from"
    assert table[1][:4] == ["badnets", "none", "99.0", "100.0"]
    assert len(table) == 5  # header + none, sft-theta, anp, recommended (lira: not run)
    with open(out / "sft-1-test-figure.csv") as fh:
        drawn = list(csv.reader(fh))
    assert drawn[0] == ["attack", "method", "asr_ours", "asr_paper"] and drawn[2][2:] == ["40.0", "1.86"]


def test_a_malformed_or_repeated_table_is_one_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tables": [{"id": "x", "paper": "sft"}]}))
    with pytest.raises(SmoothPurifyError, match="paper table #0 \\(x\\).*malformed"):
        load_paper_tables(bad)
    entry = {"id": "x", "paper": "sft", "table": 1, "caption": "c", "modality": "image", "dataset": "d",
             "metrics": ["asr"], "cells": [{"attack": "badnets", "method": "none", "asr": 1.0}]}
    bad.write_text(yaml.safe_dump({"tables": [entry, entry]}))
    with pytest.raises(SmoothPurifyError, match="repeat"):
        load_paper_tables(bad)


def test_the_transcribed_tables_name_our_modalities_metrics_and_only_their_own_metrics():
    tables = load_paper_tables(PAPER_TABLES)
    assert {t.modality for t in tables} >= {"image", "multilabel", "video", "pointcloud", "translation"}
    for table in tables:
        get_modality(table.modality)
        assert set(table.metrics) <= set(LABELS), table.id
        for cell in table.cells:
            extra = set(cell) - {"attack", "method"} - set(table.metrics)
            assert not extra, (table.id, cell)
            assert all(isinstance(cell[m], (int, float)) for m in table.metrics if m in cell), (table.id, cell)


def test_a_matrix_supplies_the_attacks_the_run_did_not_train_from_one_model_each(run_dir, tmp_path):
    matrix = tmp_path / "matrix.json"
    matrix.write_text(json.dumps({"rows": {
        "lira": {"none": {"asr": 0.97, "acc": 0.88}, "sft": {"asr": 0.5, "acc": 0.87, "seconds": {"total": 30.0}}},
        "badnets": {"none": {"asr": 0.5, "acc": 0.5}}}}))   # the run has badnets: the matrix is not read for it
    sources = [RunSource(Run("image", run_dir)), MatrixSource(matrix)]
    rows, not_run = compare(TABLE, sources, ["sft"])
    assert not_run == []
    lira = {r["method"]: r for r in rows if r["attack"] == "lira"}
    assert (lira["none"]["asr_ours"], lira["none"]["asr_paper"], lira["none"]["source"]) == (97.0, 99.2, "matrix")
    assert lira["sft"]["acc_ours"] == 87.0 and lira["sft"]["lambda_max_ours"] is None
    badnets = {r["method"]: r for r in rows if r["attack"] == "badnets"}
    assert badnets["none"]["asr_ours"] == 99.0 and badnets["none"]["source"] == "run"
    assert badnets["anp"]["source"] == "-"
