from __future__ import annotations

from typing import Any

from prefect import task

from pipeline.scan import scan_stage


@task(name="scan", cache_policy=None, task_run_name="scan-{attack}-{model_name}")
def scan(modality: str, params: dict[str, Any], attack: str, model_name: str, force: bool = False) -> dict[str, Any]:
    """The backdoor scan (clean data only) of ``backdoored`` or ``purified/<method>`` (params ``scan``)."""
    return scan_stage(modality, params, attack, model_name, force=force)
