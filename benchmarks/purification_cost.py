"""Purification cost and quality, all methods in one process on one backdoored model (issue 3 benchmark).

(a) per-epoch cost of each method as a ratio to vanilla FT at equal epochs;
(b) end to end at each method's default settings (params.yaml profile): wall seconds split into
    setup + tuning, ASR and ACC, with the seconds as ratios to FT and to FT-SAM;
(c) a profile of where f-SFT's time goes (torch.profiler, top operators).

    python benchmarks/purification_cost.py [--profile smoke] [--attack badnets] [--epochs 3] [--threads 1]

Timings on a shared machine: pin the process to one idle core (``taskset -c 1 env OMP_NUM_THREADS=1``)
with ``--threads 1``; the thread count is written into the results.

Reads/creates the run folder of params.yaml (prepare + train if the model is missing). Writes
benchmarks/results/purification_cost.{md,json}. Timings are ratios measured in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import pipeline
from smoothpurify.methods import method_config
from modalities.contract import get_modality
from pipeline.params import load_params
from smoothpurify.purify import purify

RESULTS = Path(__file__).resolve().parent / "results"


def load_setup(params: dict, attack: str, progress: bool = True):
    """The image run folder of ``params`` (prepared and trained if missing): the modality, the
    ``attack`` model, the clean validation split and ``evaluate(model)`` on the test set, all on
    ``image.device``."""
    pipeline.prepare("image", params)
    pipeline.train_attack("image", params, attack, progress=progress)
    mod = get_modality("image")
    root = pipeline.run_root(params, "image")
    model, _ = mod.load_model(root / "models" / attack)
    trigger = mod.load_attack(root / "models" / attack, mod.data_meta(root / "data"))
    x, y = mod.load_split(root / "data", "val")
    device = params["image"].get("device", "cpu")
    return mod, model, x, y, lambda m: mod.evaluate(m.to(device), root / "data", trigger, device=device)


def per_epoch_costs(mod, model, x, y, params: dict, methods: list[str], epochs: int) -> dict[str, float]:
    """Tuning seconds per epoch at equal epochs (setup excluded)."""
    out = {}
    for method in methods:
        overrides = {**pipeline.method_overrides(params, method), "epochs": epochs}
        result = purify(model, x, y, mod.likelihood, method_config(method, overrides), progress=False)
        out[method] = result.record["seconds"]["tuning"] / epochs
    return out


def end_to_end(mod, model, x, y, evaluate, params: dict, methods: list[str]) -> dict[str, dict]:
    out = {}
    for method in methods:
        cfg = method_config(method, pipeline.method_overrides(params, method))
        t0 = time.perf_counter()
        result = purify(model, x, y, mod.likelihood, cfg, progress=False)
        wall = time.perf_counter() - t0
        out[method] = {**result.record["seconds"], "wall": round(wall, 2), **evaluate(result.model),
                       "epochs": cfg.epochs}
    return out


def profile_fsft(mod, model, x, y, params: dict) -> list[tuple[str, float]]:
    cfg = method_config("fsft", {**pipeline.method_overrides(params, "fsft"), "epochs": 2, "trace_every": 1})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        purify(model, x, y, mod.likelihood, cfg, progress=False)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return [(e.key, round(e.self_cpu_time_total / 1e6, 3)) for e in events]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--epochs", type=int, default=3, help="epochs for the equal-epoch cost comparison")
    ap.add_argument("--methods", default="ft,ft-sam,sft,fsft,ngf")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params("params.yaml", args.profile)
    methods = args.methods.split(",")
    mod, model, x, y, evaluate = load_setup(params, args.attack)
    before = evaluate(model)
    costs = per_epoch_costs(mod, model, x, y, params, methods, args.epochs)
    e2e = end_to_end(mod, model, x, y, evaluate, params, methods)
    prof = profile_fsft(mod, model, x, y, params)
    ft, sam = e2e["ft"]["total"], e2e.get("ft-sam", {}).get("total")
    ratio = (f"\nf-SFT per epoch / FT-SAM per epoch: {costs['fsft'] / costs['ft-sam']:.2f}"
             if "fsft" in costs and "ft-sam" in costs else "")
    lines = [f"# Purification cost — {args.attack}, profile {params['profile']}, {len(y)} clean samples, "
             f"{torch.get_num_threads()} threads", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; taskset: "
             f"{sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '-'}{ratio}", "",
             f"Before: ASR {100 * before['asr']:.2f} %, ACC {100 * before['acc']:.2f} %", "",
             f"## (a) per-epoch cost at {args.epochs} epochs (ratio to ft)", "",
             "| method | s/epoch | ratio to ft |", "|---|---|---|"]
    lines += [f"| {m} | {c:.3f} | {c / costs['ft']:.2f} |" for m, c in costs.items()]
    lines += ["", "## (b) end to end at default settings", "",
              "| method | epochs | setup s | tuning s | total s | / ft | / ft-sam | ASR % | ACC % | RA % |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in e2e.items():
        ratio_sam = f"{r['total'] / sam:.3f}" if sam else "-"
        lines.append(f"| {m} | {r['epochs']} | {r['setup']:.2f} | {r['tuning']:.2f} | {r['total']:.2f} | "
                     f"{r['total'] / ft:.3f} | {ratio_sam} | {100 * r['asr']:.2f} | {100 * r['acc']:.2f} | "
                     f"{100 * r['ra']:.2f} |")
    lines += ["", "## (c) where f-SFT's time goes (2 epochs, trace every step; self CPU seconds)", ""]
    lines += [f"- `{k}`: {v}" for k, v in prof]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "purification_cost.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "purification_cost.json").write_text(json.dumps(
        {"threads": torch.get_num_threads(), "before": before, "per_epoch": costs, "end_to_end": e2e,
         "fsft_profile": prof}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
