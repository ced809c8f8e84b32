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


def test_kubernetes_job_manifest_asks_for_a_gpu_per_cell():
    from flows.cluster import render_job

    job = render_job()
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == "smoothpurify"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "smoothpurify-runs"
    assert "{{" not in str(job)  # every placeholder filled
    two = render_job({"gpus": 2, "image": "me/smoothpurify:1", "namespace": "lab"})
    assert two["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert two["spec"]["template"]["spec"]["containers"][0]["image"] == "me/smoothpurify:1"
    assert two["metadata"]["namespace"] == "lab"
