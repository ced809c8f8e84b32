"""Two purifications at once on a local Dask cluster (2 workers, loopback): same results as serial."""
from __future__ import annotations

import copy

import pytest

import pipeline


@pytest.mark.slow
def test_dask_fanout_runs_two_purifications_concurrently_with_serial_results(tiny_params, tmp_path):
    from flows.fanout import run_fanout

    methods = ["ft", "ngf"]
    serial_params = copy.deepcopy(tiny_params)
    serial_params["run_dir"] = str(tmp_path / "serial")
    pipeline.prepare("image", serial_params)
    pipeline.train_attack("image", serial_params, "badnets", progress=False)
    serial = {m: pipeline.purify("image", serial_params, "badnets", m, progress=False) for m in methods}

    cells = run_fanout("image", tiny_params, "badnets", methods, workers=2, runner="dask")
    assert set(cells) == set(methods)
    for m in methods:
        assert cells[m]["record"]["after"] == serial[m]["after"], m
        assert cells[m]["record"]["before"] == serial[m]["before"], m
    (a, b) = cells.values()
    assert a["pid"] != b["pid"]  # two worker processes
    assert a["start"] < b["end"] and b["start"] < a["end"]  # at the same time
