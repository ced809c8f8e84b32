from __future__ import annotations

from typing import Any

from prefect import task

import pipeline


@task(name="prepare-data", cache_policy=None)
def prepare_data(modality: str, params: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """Write the train / clean-validation / test splits of ``modality`` under ``runs/<modality>/data``."""
    return pipeline.prepare(modality, params, force=force)
