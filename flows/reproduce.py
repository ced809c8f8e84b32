"""Every modality's pipeline, then the papers' tables with our numbers beside theirs: the deployment
entry ``flows/reproduce.py:reproduce_flow`` (prefect.yaml ``reproduce-smoke``) and
``python -m flows.reproduce --profile smoke [--modalities image,video]``.

Each modality runs as a subflow of :func:`flows.backdoor.backdoor_flow` (one flow run per modality in
the UI, each resuming from its finished stages); a modality that fails is reported and the others still
run, then ``runs/tables/`` is written from whatever finished (``dvc repro`` builds the same tables).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import flow

from flows.backdoor import backdoor_flow, run_entry
from modalities.contract import available_modalities
from pipeline.params import load_params
from smoothpurify import SmoothPurifyError
from tasks.tables import write_tables

ORDER = ["image", "multilabel", "pointcloud", "video", "translation"]  # the papers' order (SFT §6)


def modality_order(requested: list[str] | None) -> list[str]:
    """The modalities to run: the requested ones (checked), else every registered one, papers' order first."""
    known = available_modalities()
    if requested:
        unknown = [m for m in requested if m not in known]
        if unknown:
            raise SmoothPurifyError(f"unknown modality {', '.join(unknown)}; choose from: {', '.join(known)}")
        return list(requested)
    return [m for m in ORDER if m in known] + [m for m in known if m not in ORDER]


@flow(name="reproduce", log_prints=True)
def reproduce_flow(profile: str | None = None, params_path: str = "params.yaml", modalities: list[str] | None = None,
                   force: bool = False) -> dict[str, Any]:
    params = load_params(params_path, profile)
    finished, failed = [], {}
    for modality in modality_order(modalities):
        run = backdoor_flow.with_options(flow_run_name=f"{modality}-{params['profile']}")
        try:
            run(modality=modality, profile=profile, params_path=params_path, force=force)
            finished.append(modality)
        except Exception as err:  # one modality's failure must not hide the others' tables
            failed[modality] = f"{type(err).__name__}: {err}"
            print(f"{modality}: failed ({failed[modality]})")
    index = write_tables(params)
    print(f"tables: {index}")
    if failed:
        raise SmoothPurifyError(f"reproduce: {len(failed)} modality run(s) failed: {', '.join(failed)}; "
                                f"the tables hold the others ({index})")
    return {"modalities": finished, "tables": index}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=None, help="params.yaml profile (default: the file's `profile`)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--modalities", default=None, help="comma-separated (default: every registered one)")
    parser.add_argument("--force", action="store_true", help="recompute stages even if their outputs are current")
    args = parser.parse_args(argv)
    names = args.modalities.split(",") if args.modalities else None
    return run_entry(lambda: modality_order(names),  # the flow orders them again: checked here, before Prefect
                     lambda: reproduce_flow(profile=args.profile, params_path=args.params, modalities=names,
                                            force=args.force))

if __name__ == "__main__":
    sys.exit(main())
