"""The GPU-cluster fan-out: one flow run per matrix cell on a Kubernetes work pool.

``purify_cell_flow`` is deployed as ``purify-cell/k8s-gpu`` (prefect.yaml) on the work pool
``smoothpurify-k8s``, whose base job template is ``deploy/k8s-work-pool.json`` (one GPU per cell,
``nvidia.com/gpu`` in requests and limits, a shared volume for ``runs/``). ``matrix_flow`` asks for
one run of that deployment per (attack, method) with ``run_deployment``; the pool's concurrency limit
caps how many run at once (``prefect work-pool set-concurrency-limit smoothpurify-k8s 8``). Data and
models are built first by the modality's own flow, so cells only read them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.utilities.templating import apply_values

import pipeline
from pipeline.params import load_params

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "k8s-work-pool.json"
CELL_DEPLOYMENT = "purify-cell/k8s-gpu"


@flow(name="purify-cell")
def purify_cell_flow(modality: str = "image", profile: str | None = None, params_path: str = "params.yaml",
                     attack: str = "badnets", method: str = "recommended") -> dict[str, Any]:
    """One cell: purify ``attack``'s model with ``method`` (its inputs already on the shared volume)."""
    return pipeline.purify(modality, load_params(params_path, profile), attack, method, progress=False)


@flow(name="matrix-on-cluster")
def matrix_flow(modality: str = "image", profile: str | None = "paper", attacks: list[str] | None = None,
                methods: list[str] | None = None) -> dict[str, str]:
    """One run of ``purify-cell/k8s-gpu`` per cell, all submitted at once; returns their states."""
    from prefect.deployments import run_deployment

    params = load_params("params.yaml", profile)
    attacks = attacks or params[modality]["attacks"]
    methods = methods or params["purify"]["methods"]
    runs = {f"{a}/{m}": run_deployment(CELL_DEPLOYMENT, parameters={"modality": modality, "profile": profile,
                                                                     "attack": a, "method": m}, timeout=0)
            for a in attacks for m in methods}
    return {cell: str(run.state_name) for cell, run in runs.items()}


def render_job(values: dict[str, Any] | None = None, template: Path = TEMPLATE) -> dict[str, Any]:
    """The Job manifest a worker of the pool would submit: the template's defaults, then ``values``."""
    spec = json.loads(template.read_text())
    defaults = {k: v.get("default") for k, v in spec["variables"]["properties"].items()}
    return apply_values(spec["job_configuration"], {**defaults, **(values or {})})["job_manifest"]
