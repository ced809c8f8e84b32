"""The backdoor-purification flow, for any modality: prepare data -> train benign and backdoored models ->
evaluate -> purify (each method) -> smoothness analysis -> report (report.md + report.html) and tables.

Runs with no Prefect server (ephemeral mode): ``python -m flows.backdoor --modality image --profile smoke``.
A modality's deployment entry is a thin flow over :func:`run_pipeline` (``flows/image.py``).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from rich.console import Console
from prefect import flow

from flows.orphans import guard_temporary_server
from smoothpurify import SmoothPurifyError
from smoothpurify.smoothness import analysis_settings
from modalities.contract import get_modality
from pipeline import BACKDOORED, BENIGN, Run, check_names
from pipeline.params import load_params
from pipeline.report.tables import (SMOOTHNESS_COLUMNS, attack_columns, attack_rows, method_columns, method_rows,
                                    print_table, rows_and_verdicts, save_rows, smoothness_rows)
from pipeline.report.verdict import overall_sentence
from pipeline.scan import scan_settings
from tasks.analyze import analyze, build_analysis_batch
from tasks.attack import train_attack
from tasks.evaluate import evaluate
from tasks.prepare import prepare_data
from tasks.purify import purify
from tasks.scan import scan
from tasks.report import write_report


def selection(modality: str, params: dict[str, Any], attacks: list[str] | None,
              methods: list[str] | None) -> tuple[list[str], list[str]]:
    """The attacks and methods to run (params' lists unless given), checked before any work."""
    attacks = attacks or get_modality(modality).config(params).attacks
    methods = (params.get("purify", {}) or {}).get("methods", []) if methods is None else methods
    check_names(modality, params, attacks, methods)
    return attacks, methods


def run_pipeline(modality: str, params: dict[str, Any], attacks: list[str] | None = None,
                 methods: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Every stage for ``modality`` as Prefect tasks (inside a flow), then the tables; returns the summary."""
    attacks, methods = selection(modality, params, attacks, methods)
    run = Run(modality, params)
    started = time.perf_counter()
    data = prepare_data(modality, params, force=force)
    print(f"data: {data['source']} — sizes {data['sizes']}")
    for name in [BENIGN, *attacks]:
        train_attack(modality, params, name, force=force)
    analysis_on = analysis_settings(params.get("analysis")).enabled
    scan_settings(params)  # a bad scan section fails here, before any training
    for name in attacks:
        evaluate(modality, params, name)
        for method in methods:
            purify(modality, params, name, method, force=force)
        if analysis_on:
            build_analysis_batch(modality, params, name)
            for model in [BENIGN, BACKDOORED, *(f"purified/{m}" for m in methods)]:
                analyze(modality, params, name, model, force=force)
        # evidence without poisoned data, before and after purification (params scan.enabled; off:
        # a one-line record, so that DVC's scan stages have their outputs)
        for model in [BACKDOORED, *(f"purified/{m}" for m in methods)]:
            scan(modality, params, name, model, force=force)
    md, page = write_report(modality, params, attacks, methods)
    rows = attack_rows(run, attacks)
    purification = method_rows(modality, params, attacks, methods, mark_best=True)
    smoothness = smoothness_rows(modality, params, attacks, methods) if analysis_on else []
    _, verdicts = rows_and_verdicts(modality, params, attacks, methods)
    summary = {"attacks": rows, "purification": purification, "smoothness": smoothness,
               "verdict": [overall_sentence(verdicts), *(v.sentence() for v in verdicts)]}
    save_rows(run.summary_json, summary)
    print_table(rows, f"{modality} / {run.section.get('model')} / profile {params['profile']}: backdoored models",
                attack_columns(run.modality.metrics))
    print_table(purification, f"purification on {data['sizes']['val']} clean validation samples "
                              "(* best among the methods that removed the backdoor)", method_columns(run.modality.metrics))
    print_table(smoothness, "smoothness (fixed batch: clean + poisoned inputs with true labels)",
                SMOOTHNESS_COLUMNS)
    # On stdout like the tables: Prefect's log_prints would send print() to a log hidden at WARNING.
    console = Console() if Console().is_terminal else Console(width=200)
    console.print("\n".join(["verdict: " + summary["verdict"][0], *(f"  {line}" for line in summary["verdict"][1:]),
                             f"total {time.perf_counter() - started:.0f} s; report: {md} | {page}"]),
                  markup=False, highlight=False, soft_wrap=True)
    return summary


@flow(name="backdoor-purification", log_prints=True)
def backdoor_flow(modality: str = "image", profile: str | None = None, params_path: str = "params.yaml",
                  attacks: list[str] | None = None, methods: list[str] | None = None,
                  overrides: dict[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
    return run_pipeline(modality, load_params(params_path, profile, overrides), attacks, methods, force)


# After SIGTERM, Prefect reports the stopped run to its API; when the same signal has already ended the
# temporary server (a whole process group stopped), that report retries for minutes. Past this grace
# the process exits anyway: finished stages are on disk, and the next run resumes from them.
STOP_GRACE_SECONDS = 10.0


def _stop(signum: int, _frame: Any) -> None:
    timer = threading.Timer(STOP_GRACE_SECONDS, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt(f"stopped by signal {signum}")


class _UserErrorsWithoutTraceback(logging.Filter):
    """Bad input is one ``error:`` line; keep Prefect from adding a SmoothPurifyError's traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SmoothPurifyError):
            record.exc_info, record.exc_text = None, None
        return True


def main(argv: list[str] | None = None, modality: str | None = None, flow_fn: Any = None) -> int:
    """``python -m flows.backdoor --modality M`` (or a modality's own entry with ``modality`` fixed)."""
    parser = argparse.ArgumentParser(prog=f"python -m flows.{modality or 'backdoor'}", description=__doc__)
    if modality is None:
        parser.add_argument("--modality", default="image", help="modality plugin (see `smoothpurify list`)")
    parser.add_argument("--profile", default=None, help="params.yaml profile (default: the file's `profile`)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--attacks", default=None, help="comma-separated attack names (default: params)")
    parser.add_argument("--methods", default=None, help="comma-separated purification methods (default: params; "
                                                         "'' for none)")
    parser.add_argument("--force", action="store_true", help="recompute stages even if their outputs are current")
    args = parser.parse_args(argv)
    modality = modality or args.modality
    attacks = args.attacks.split(",") if args.attacks else None
    methods = None if args.methods is None else [m for m in args.methods.split(",") if m]
    kw = dict(profile=args.profile, params_path=args.params, attacks=attacks, methods=methods, force=args.force)
    return run_entry(lambda: selection(modality, load_params(args.params, args.profile), attacks, methods),
                     lambda: flow_fn(**kw) if flow_fn is not None else backdoor_flow(modality=modality, **kw))


def run_entry(check: Callable[[], Any], start: Callable[[], Any]) -> int:
    """A flow's command-line run: ``check`` the inputs (one-line errors, before Prefect starts), then
    ``start`` the flow; 2 on a user error, 130 when stopped (Ctrl-C or SIGTERM)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_UserErrorsWithoutTraceback())
    # SIGTERM (a scheduler stopping the job) stops the flow like Ctrl-C: Prefect marks the run and shuts
    # down its temporary server instead of hanging; finished stages are kept and resume on the next run.
    signal.signal(signal.SIGTERM, _stop)
    try:
        check()
        guard_temporary_server()  # a kill -9 of this process leaves no temporary Prefect server behind
        start()
    except SmoothPurifyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped; finished stages are kept and the next run resumes from them", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
