"""The application: runs, stages, analysis, reports and the CLI over the library and the modality plugins.

Imports ``smoothpurify`` and ``modalities.contract`` only, never a concrete modality, never Prefect
(``tasks`` and ``flows`` wrap these functions for Prefect and DVC).
"""
from pipeline.run import BACKDOORED, BENIGN, Run
from pipeline.stages import (check_names, evaluate, method_overrides, method_runner, prepare, purify, run_root,
                             train_attack)

__all__ = ["Run", "BENIGN", "BACKDOORED", "prepare", "train_attack", "evaluate", "purify", "method_runner",
           "method_overrides", "check_names", "run_root"]
