"""The translation modality's flow: the deployment entry ``flows/translation.py:translation_flow``
(prefect.yaml) and ``python -m flows.translation --profile smoke``; the stages are the generic
:func:`flows.backdoor.run_pipeline`."""
from __future__ import annotations

import sys
from typing import Any

from prefect import flow

from flows.backdoor import main as backdoor_main
from flows.backdoor import run_pipeline
from pipeline.params import load_params

MODALITY = "translation"


@flow(name="translation-backdoor", log_prints=True)
def translation_flow(profile: str | None = None, params_path: str = "params.yaml", attacks: list[str] | None = None,
                    methods: list[str] | None = None, overrides: dict[str, Any] | None = None,
                    force: bool = False) -> dict[str, Any]:
    return run_pipeline(MODALITY, load_params(params_path, profile, overrides), attacks, methods, force)


def main(argv: list[str] | None = None) -> int:
    return backdoor_main(argv, modality=MODALITY, flow_fn=translation_flow)


if __name__ == "__main__":
    sys.exit(main())
