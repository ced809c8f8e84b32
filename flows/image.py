"""Image pipeline: prepare data -> train benign and backdoored models -> evaluate -> purify (each method)
-> smoothness analysis -> report (report.md + report.html) and tables.

Runs with no Prefect server (ephemeral mode): ``python -m flows.image --profile smoke``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from prefect import flow

from smoothpurify import SmoothPurifyError
from smoothpurify.modality import get_modality
from smoothpurify.params import load_params
from smoothpurify.pipeline import BENIGN, check_names, run_root
from smoothpurify.analysis import BACKDOORED, analysis_settings
from smoothpurify.report import ATTACK_COLUMNS, attack_rows, print_table, save_rows
from smoothpurify.report_doc import METHOD_COLUMNS, SMOOTHNESS_COLUMNS, method_rows, smoothness_rows
from tasks.analyze import analyze, build_analysis_batch
from tasks.attack import train_attack
from tasks.evaluate import evaluate
from tasks.prepare import prepare_data
from tasks.purify import purify
from tasks.report import write_report

MODALITY = "image"


def selection(params: dict[str, Any], attacks: list[str] | None,
              methods: list[str] | None) -> tuple[list[str], list[str]]:
    """The attacks and methods to run (params' lists unless given), checked before any work."""
    attacks = attacks or get_modality(MODALITY).config(params).attacks
    methods = (params.get("purify", {}) or {}).get("methods", []) if methods is None else methods
    check_names(MODALITY, params, attacks, methods)
    return attacks, methods


@flow(name="image-backdoor", log_prints=True)
def image_flow(profile: str | None = None, params_path: str = "params.yaml", attacks: list[str] | None = None,
               methods: list[str] | None = None, overrides: dict[str, Any] | None = None,
               force: bool = False) -> dict[str, Any]:
    params = load_params(params_path, profile, overrides)
    attacks, methods = selection(params, attacks, methods)
    started = time.perf_counter()
    data = prepare_data(MODALITY, params, force=force)
    print(f"data: {data['source']} — sizes {data['sizes']}")
    for name in [BENIGN, *attacks]:
        train_attack(MODALITY, params, name, force=force)
    analysis_on = analysis_settings(params.get("analysis")).enabled
    for name in attacks:
        evaluate(MODALITY, params, name)
        for method in methods:
            purify(MODALITY, params, name, method, force=force)
        if analysis_on:
            build_analysis_batch(MODALITY, params, name)
            for model in [BENIGN, BACKDOORED, *(f"purified/{m}" for m in methods)]:
                analyze(MODALITY, params, name, model, force=force)
    md, page = write_report(MODALITY, params, attacks, methods)
    root = run_root(params, MODALITY)
    rows = attack_rows(root / "metrics", attacks)
    purification = method_rows(MODALITY, params, attacks, methods, mark_best=True)
    smoothness = smoothness_rows(MODALITY, params, attacks, methods) if analysis_on else []
    summary = {"attacks": rows, "purification": purification, "smoothness": smoothness}
    save_rows(root / "summary.json", summary)
    print_table(rows, f"image / {params['image']['model']} / profile {params['profile']}: backdoored models",
                ATTACK_COLUMNS)
    print_table(purification, f"purification on {data['sizes']['val']} clean validation samples "
                              "(* best per attack)", METHOD_COLUMNS)
    print_table(smoothness, "smoothness (fixed batch: clean + poisoned inputs with true labels)",
                SMOOTHNESS_COLUMNS)
    print(f"total {time.perf_counter() - started:.0f} s; report: {md} | {page}")
    return summary


class _UserErrorsWithoutTraceback(logging.Filter):
    """Bad input is one ``error:`` line; keep Prefect from adding a SmoothPurifyError's traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SmoothPurifyError):
            record.exc_info, record.exc_text = None, None
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.image", description=__doc__)
    parser.add_argument("--profile", default=None, help="params.yaml profile (default: the file's `profile`)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--attacks", default=None, help="comma-separated attack names (default: params)")
    parser.add_argument("--methods", default=None, help="comma-separated purification methods (default: params; "
                                                         "'' for none)")
    parser.add_argument("--force", action="store_true", help="recompute stages even if their outputs are current")
    args = parser.parse_args(argv)
    attacks = args.attacks.split(",") if args.attacks else None
    methods = None if args.methods is None else [m for m in args.methods.split(",") if m]
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_UserErrorsWithoutTraceback())
    try:
        selection(load_params(args.params, args.profile), attacks, methods)  # one-line errors, before Prefect starts
        image_flow(profile=args.profile, params_path=args.params, attacks=attacks, methods=methods, force=args.force)
    except SmoothPurifyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
