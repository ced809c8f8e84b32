from __future__ import annotations

from typing import Any

from prefect import task

from pipeline.analysis import analysis_batch, analyze_stage


@task(name="analysis-batch", cache_policy=None, task_run_name="analysis-batch-{attack}")
def build_analysis_batch(modality: str, params: dict[str, Any], attack: str, force: bool = False) -> dict[str, Any]:
    """The attack's fixed analysis batch (clean + poisoned-with-true-labels test samples), built once."""
    _, targets, mask = analysis_batch(modality, params, attack, force=force)
    return {"attack": attack, "n_clean": int((~mask).sum()), "n_poison": int(mask.sum()), "size": len(targets)}


@task(name="analyze", cache_policy=None, task_run_name="analyze-{attack}-{model_name}")
def analyze(modality: str, params: dict[str, Any], attack: str, model_name: str, force: bool = False) -> dict[str, Any]:
    """lambda_max, Tr(H), Tr(F) and the spectral density of one model on ``attack``'s fixed batch.

    ``model_name``: ``benign``, ``backdoored`` (the attack's model) or ``purified/<method>``.
    """
    return analyze_stage(modality, params, attack, model_name, force=force)
