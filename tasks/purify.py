from __future__ import annotations

from typing import Any

from prefect import task

import pipeline


@task(name="purify", cache_policy=None, task_run_name="purify-{attack}-{method}")
def purify(modality: str, params: dict[str, Any], attack: str, method: str, force: bool = False) -> dict[str, Any]:
    """Purify the ``attack`` model with ``method`` on the clean validation split; ACC/ASR/RA before and after."""
    return pipeline.purify(modality, params, attack, method, force=force)
