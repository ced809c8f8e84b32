from __future__ import annotations

from typing import Any

from prefect import task

import pipeline


@task(name="evaluate", cache_policy=None, task_run_name="evaluate-{attack}")
def evaluate(modality: str, params: dict[str, Any], attack: str) -> dict[str, Any]:
    """ACC / ASR / RA of the benign and the backdoored model under ``attack``'s trigger."""
    return pipeline.evaluate(modality, params, attack)
