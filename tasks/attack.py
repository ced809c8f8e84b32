from __future__ import annotations

from typing import Any

from prefect import task

import pipeline


@task(name="train-attack", cache_policy=None, task_run_name="train-{attack}")
def train_attack(modality: str, params: dict[str, Any], attack: str, force: bool = False) -> dict[str, Any]:
    """Train the benign model (``attack="benign"``) or a model backdoored by ``attack``."""
    return pipeline.train_attack(modality, params, attack, force=force)
