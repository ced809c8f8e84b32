"""Image pipeline: prepare data -> train benign and backdoored models -> evaluate -> purify (each method) -> tables.

Runs with no Prefect server (ephemeral mode): ``python -m flows.image --profile smoke``.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from prefect import flow

from smoothpurify import SmoothPurifyError
from smoothpurify.params import load_params
from smoothpurify.pipeline import BENIGN, run_root
from smoothpurify.report import ATTACK_COLUMNS, METHOD_COLUMNS, attack_rows, print_table, purify_rows, save_rows
from tasks.attack import train_attack
from tasks.evaluate import evaluate
from tasks.prepare import prepare_data
from tasks.purify import purify

MODALITY = "image"


@flow(name="image-backdoor", log_prints=True)
def image_flow(profile: str | None = None, params_path: str = "params.yaml", attacks: list[str] | None = None,
               methods: list[str] | None = None, overrides: dict[str, Any] | None = None,
               force: bool = False) -> dict[str, Any]:
    params = load_params(params_path, profile, overrides)
    attacks = attacks or params[MODALITY]["attacks"]
    methods = (params.get("purify", {}) or {}).get("methods", []) if methods is None else methods
    started = time.perf_counter()
    data = prepare_data(MODALITY, params, force=force)
    print(f"data: {data['source']} — sizes {data['sizes']}")
    for name in [BENIGN, *attacks]:
        train_attack(MODALITY, params, name, force=force)
    for name in attacks:
        evaluate(MODALITY, params, name)
        for method in methods:
            purify(MODALITY, params, name, method, force=force)
    root = run_root(params, MODALITY)
    rows = attack_rows(root / "metrics", attacks)
    tables = {name: purify_rows(root / "metrics" / "purify", name, methods) for name in attacks}
    summary = {"attacks": rows, "purification": tables}
    save_rows(root / "summary.json", summary)
    print_table(rows, f"image / {params['image']['model']} / profile {params['profile']}: backdoored models",
                ATTACK_COLUMNS)
    for name, table in tables.items():
        print_table(table, f"purification of the {name} model (clean validation: "
                           f"{data['sizes']['val']} samples)", METHOD_COLUMNS)
    print(f"total {time.perf_counter() - started:.0f} s; outputs in {root}")
    return summary


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
    try:
        image_flow(profile=args.profile, params_path=args.params, attacks=attacks, methods=methods, force=args.force)
    except SmoothPurifyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
