"""Image pipeline: prepare data -> train benign and backdoored models -> evaluate -> table.

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
from smoothpurify.report import ATTACK_COLUMNS, attack_rows, print_table, save_rows
from tasks.attack import train_attack
from tasks.evaluate import evaluate
from tasks.prepare import prepare_data

MODALITY = "image"


@flow(name="image-backdoor", log_prints=True)
def image_flow(profile: str | None = None, params_path: str = "params.yaml", attacks: list[str] | None = None,
               overrides: dict[str, Any] | None = None, force: bool = False) -> list[dict[str, Any]]:
    params = load_params(params_path, profile, overrides)
    attacks = attacks or params[MODALITY]["attacks"]
    started = time.perf_counter()
    data = prepare_data(MODALITY, params, force=force)
    print(f"data: {data['source']} — sizes {data['sizes']}")
    for name in [BENIGN, *attacks]:
        train_attack(MODALITY, params, name, force=force)
    for name in attacks:
        evaluate(MODALITY, params, name)
    root = run_root(params, MODALITY)
    rows = attack_rows(root / "metrics", attacks)
    save_rows(root / "summary.json", rows)
    print_table(rows, f"image / {params['image']['model']} / profile {params['profile']} "
                      f"({time.perf_counter() - started:.0f} s)", ATTACK_COLUMNS)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.image", description=__doc__)
    parser.add_argument("--profile", default=None, help="params.yaml profile (default: the file's `profile`)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--attacks", default=None, help="comma-separated attack names (default: params)")
    parser.add_argument("--force", action="store_true", help="recompute stages even if their outputs are current")
    args = parser.parse_args(argv)
    attacks = args.attacks.split(",") if args.attacks else None
    try:
        image_flow(profile=args.profile, params_path=args.params, attacks=attacks, force=args.force)
    except SmoothPurifyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
