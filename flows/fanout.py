"""Matrix cells in parallel through Prefect's own task runners: one purification per task.

On one machine the cells run on a local Dask cluster (prefect-dask's ``DaskTaskRunner``, one process
per worker, one thread each); on a cluster each cell is a flow run of a deployment (the Kubernetes
work pool, ``deploy/k8s-work-pool.json``, ``run_deployment``). The stages before purification
(data, models) run first, serially, since every cell reads them. Results are the same as serial
runs: a purification is seeded and reads only its own inputs.

    python -m flows.fanout --attack badnets --methods ft,ngf,recommended --workers 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

import pipeline
from modalities.contract import BENIGN
from pipeline.params import load_params


@task(name="purify-cell", cache_policy=None, task_run_name="cell-{attack}-{method}")
def purify_cell(modality: str, params: dict[str, Any], attack: str, method: str) -> dict[str, Any]:
    """One cell; its record with where (process) and when (wall clock) it ran."""
    start = time.time()
    record = pipeline.purify(modality, params, attack, method, progress=False)
    return {"record": record, "pid": os.getpid(), "start": start, "end": time.time()}


@flow(name="purify-fanout", log_prints=True)
def fanout_flow(modality: str, params: dict[str, Any], attack: str, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Every method on ``attack``'s model as concurrent tasks of this flow's task runner."""
    futures = {method: purify_cell.submit(modality, params, attack, method) for method in methods}
    return {method: future.result() for method, future in futures.items()}


def dask_runner(workers: int = 2):
    from prefect_dask import DaskTaskRunner

    # processes, not threads: torch releases the GIL but each cell then owns its own thread pool
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def run_fanout(modality: str, params: dict[str, Any], attack: str, methods: list[str], workers: int = 2,
               runner: str = "dask") -> dict[str, dict[str, Any]]:
    """Prepare the data and the models serially, then purify ``methods`` concurrently."""
    pipeline.prepare(modality, params)
    for name in (BENIGN, attack):
        pipeline.train_attack(modality, params, name, progress=False)
    task_runner = dask_runner(workers) if runner == "dask" else ThreadPoolTaskRunner(max_workers=1)
    return fanout_flow.with_options(task_runner=task_runner)(modality, params, attack, methods)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modality", default="image")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--methods", default="ft,ngf")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runner", choices=["dask", "serial"], default="dask")
    args = ap.parse_args(argv)
    params = load_params(args.params, args.profile)
    records = run_fanout(args.modality, params, args.attack, args.methods.split(","), args.workers, args.runner)
    for method, cell in records.items():
        rec = cell["record"]
        print(f"{args.attack}/{method}: before {rec['before']} after {rec['after']} (process {cell['pid']}, "
              f"{cell['end'] - cell['start']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
