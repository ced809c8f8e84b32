"""Scheduled regression run: a modality's pipeline, then its metrics against the accepted ones.

Deployment ``image-regression`` (prefect.yaml, nightly cron). The flow runs the modality's flow
stages (finished, unchanged stages are skipped), compares every cell with
``regression/<modality>.json`` (:mod:`pipeline.regression`) and fails, naming each cell and
metric, when ASR rose or a clean metric fell beyond ``regression.tolerance``.
``python -m flows.regression --modality image [--accept]`` runs it once from a shell.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from flows.backdoor import run_pipeline
from modalities.contract import get_modality
from pipeline.params import load_params
from pipeline.regression import accept, collect, compare, load_accepted
from pipeline.run import Run

ACCEPTED_DIR = Path("regression")


class RegressionFailed(RuntimeError):
    """The run's metrics got worse than the accepted ones beyond the tolerance."""


def check(modality: str, params: dict[str, Any], accepted_path: Path | None = None) -> list[str]:
    """Compare the run's cells with the accepted file; return the report lines, raise on regression."""
    cells = collect(Run(modality, params).root / "metrics" / "cells")
    path = accepted_path or ACCEPTED_DIR / f"{modality}.json"
    tolerance = (params.get("regression") or {}).get("tolerance")
    findings = compare(cells, load_accepted(path)["cells"], get_modality(modality).metrics, tolerance)
    if findings:
        raise RegressionFailed(f"{modality}: {len(findings)} regression(s) against {path}:\n"
                               + "\n".join("  " + f.line() for f in findings))
    return [f"{modality}: {len(cells)} cells within tolerance of {path}"]


@flow(name="regression", log_prints=True)
def regression_flow(modality: str = "image", profile: str | None = "smoke", params_path: str = "params.yaml",
                    accepted_path: str | None = None) -> list[str]:
    params = load_params(params_path, profile)
    run_pipeline(modality, params)
    return check(modality, params, Path(accepted_path) if accepted_path else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modality", default="image")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--accepted", default=None, help="accepted metrics file (default regression/<modality>.json)")
    ap.add_argument("--accept", action="store_true", help="store the metrics under runs/ as the accepted ones")
    ap.add_argument("--no-run", action="store_true", help="only compare the metrics already under runs/")
    args = ap.parse_args(argv)
    params = load_params(args.params, args.profile)
    path = Path(args.accepted) if args.accepted else ACCEPTED_DIR / f"{args.modality}.json"
    try:
        if not args.no_run and not args.accept:
            print("\n".join(regression_flow(args.modality, args.profile, args.params, str(path))))
            return 0
        if args.accept:
            accept(collect(Run(args.modality, params).root / "metrics" / "cells"), path,
                   note=f"accepted from {Run(args.modality, params).root}")
            print(f"accepted: {path}")
            return 0
        print("\n".join(check(args.modality, params, path)))
        return 0
    except RegressionFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
