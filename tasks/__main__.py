"""DVC's entry into the tasks: ``python -m tasks <stage> --modality image [--attack NAME]``.

Each subcommand calls the underlying function of the Prefect task (``task.fn``), so a DVC stage
runs exactly the code a flow runs, without starting Prefect.
"""
from __future__ import annotations

import argparse
import sys

from smoothpurify import SmoothPurifyError
from pipeline.params import load_params
from pipeline.stages import BENIGN, check_names


def run_attack_stage(args: argparse.Namespace, params: dict) -> None:
    """The stages of one attack (and method or model): names checked before any work."""
    from tasks.analyze import analyze, build_analysis_batch
    from tasks.attack import train_attack
    from tasks.evaluate import evaluate
    from tasks.purify import purify

    if args.attack is None:
        raise SmoothPurifyError(f"stage {args.stage} needs --attack")
    if args.stage == "purify" and args.method is None:
        raise SmoothPurifyError("stage purify needs --method")
    if args.stage in ("analyze", "scan") and args.model is None:
        raise SmoothPurifyError(f"stage {args.stage} needs --model (benign, backdoored or purified/<method>)")
    check_names(args.modality, params, [] if args.attack == BENIGN else [args.attack],
                [args.method] if args.stage == "purify" else [])
    if args.stage == "attack":
        train_attack.fn(args.modality, params, args.attack, force=True)
    elif args.stage == "purify":
        purify.fn(args.modality, params, args.attack, args.method, force=True)
    elif args.stage == "analysis-batch":
        build_analysis_batch.fn(args.modality, params, args.attack, force=True)
    elif args.stage == "analyze":
        analyze.fn(args.modality, params, args.attack, args.model, force=True)
    elif args.stage == "scan":
        from tasks.scan import scan

        scan.fn(args.modality, params, args.attack, args.model, force=True)
    else:
        evaluate.fn(args.modality, params, args.attack)


def main(argv: list[str] | None = None) -> int:
    from tasks.prepare import prepare_data
    from tasks.report import write_report

    parser = argparse.ArgumentParser(prog="python -m tasks", description=__doc__)
    parser.add_argument("stage", choices=["prepare", "attack", "evaluate", "purify", "analysis-batch",
                                                       "analyze", "scan", "report", "tables"])
    parser.add_argument("--modality", default="image")
    parser.add_argument("--attack", default=None, help="attack name, or 'benign'")
    parser.add_argument("--method", default=None, help="purification method (stage purify)")
    parser.add_argument("--model", default=None, help="analyze / scan: benign | backdoored | purified/<method>")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, args.profile)
        if args.stage == "prepare":
            prepare_data.fn(args.modality, params, force=True)
        elif args.stage == "tables":
            from tasks.tables import write_tables

            print(write_tables.fn(params))
        elif args.stage == "report":
            write_report.fn(args.modality, params, params[args.modality]["attacks"],
                            (params.get("purify") or {}).get("methods") or [])
        else:
            run_attack_stage(args, params)
    except SmoothPurifyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
