"""Benchmark: every purification method against every attack on the smoke profile, one process per attack.

    .venv/bin/python benchmarks/purification_matrix.py                      # the default matrix
    .venv/bin/python benchmarks/purification_matrix.py --attacks badnets --methods fst ft

Loads params.yaml (smoke profile by default, ``--profile`` to change), sends runs to ``--run-dir``
(default ``runs-bench-matrix``, so the demo's ``runs/`` is untouched), trains each backdoored model
through the real pipeline and purifies it with each method through ``pipeline.purify`` (the DVC
stage's code path). Each attack's row runs in its own process (``--row``), so one attack's memory
or failure cannot touch another's. Writes ``benchmarks/results/purification_matrix.{json,md}``
(merged with earlier rows): ASR / ACC / RA after each method, whether it diverged, seconds, and per
method the mean ASR, mean ACC drop and the number of attacks with ASR <= 5 % and ACC drop <= 3 points.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_common import code_state, link_cache, parse_set  # noqa: E402

ATTACKS = ["badnets", "blend", "trojan", "sig", "wanet", "dynamic"]
METHODS = ["recommended", "fst-kd", "fst-kd-overlay", "fst-lr0.005", "fst", "ft-init", "ft", "ft-sam", "ft-sam-sft", "sft", "sft-authors", "fsft", "ngf",
           "cand-asam-rho1", "cand-fst-alpha0.05"]
RESULTS = ROOT / "benchmarks" / "results"
# The success bar, stated once: a purification removes the backdoor and keeps the model.
ASR_GOAL, ACC_DROP_GOAL = 0.05, 0.03


def summary(rows: dict, methods: list[str]) -> list[dict]:
    out = []
    for method in methods:
        cells = [(r["none"], r[method]) for r in rows.values() if method in r]
        if not cells:
            continue
        drops = [b["acc"] - a["acc"] for b, a in cells]
        out.append({"method": method, "attacks": len(cells),
                    "mean_asr": sum(a["asr"] for _, a in cells) / len(cells),
                    "mean_acc_drop": sum(drops) / len(cells),
                    "mean_seconds": sum(a["seconds"]["total"] for _, a in cells) / len(cells),
                    "goal_met": sum(a["asr"] <= ASR_GOAL and d <= ACC_DROP_GOAL and not a["diverged"]
                                    for (_, a), d in zip(cells, drops)),
                    "diverged": sum(a["diverged"] for _, a in cells)})
    return out


def to_markdown(store: dict) -> str:
    meta, rows = store["meta"], store["rows"]
    methods = [m for m in METHODS if any(m in r for r in rows.values())]
    methods += sorted({m for r in rows.values() for m in r} - set(methods) - {"none"})
    lines = [f"# Purification matrix ({meta['profile']} profile, {meta['data']})", "",
             f"Model `{meta['model']}` trained {meta['train']}; clean validation set of {meta['val_size']} "
             f"samples (the defender's only data), test set of {meta['test_size']}, seed {meta['seed']}, "
             f"{meta['device']}. Each cell: ASR / ACC after purification, in %. `div`: flagged as diverged "
             "(clean validation loss blew up or clean validation accuracy collapsed). One process per attack.", "",
             "| attack | none | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    for attack, r in rows.items():
        cells = []
        for m in methods:
            c = r.get(m)
            cells.append("-" if c is None else f"{c['asr']:.1%} / {c['acc']:.1%}" + (" div" if c["diverged"] else ""))
        lines.append(f"| {attack} | {r['none']['asr']:.1%} / {r['none']['acc']:.1%} | " + " | ".join(cells) + " |")
    lines += ["", f"Per method over the attacks: mean ASR, mean ACC drop (points), attacks where ASR <= "
              f"{ASR_GOAL:.0%} and the ACC drop <= {ACC_DROP_GOAL * 100:.0f} points (and not diverged), mean seconds.",
              "", "| method | attacks | mean ASR | mean ACC drop | goal met | diverged | mean seconds |",
              "|---|---|---|---|---|---|---|"]
    for s in summary(rows, methods):
        lines.append(f"| {s['method']} | {s['attacks']} | {s['mean_asr']:.1%} | {s['mean_acc_drop'] * 100:.1f} | "
                     f"{s['goal_met']}/{s['attacks']} | {s['diverged']} | {s['mean_seconds']:.1f} |")
    codes = sorted({c["code"] for r in rows.values() for m, c in r.items() if m != "none" and "code" in c})
    if codes:
        warn = [" **Cells from different code.**"] if len(codes) > 1 else []
        warn += [" **Some ran on a working tree with uncommitted edits.**"] if any(c.endswith("+dirty") for c in codes) else []
        lines += ["", "Code of the cells (commit; `+dirty`: code or params.yaml edited): " + ", ".join(codes) + "." + "".join(warn)]
    lines += ["", "Settings per method (after params.yaml's `purify.common` / `overrides`):", ""]
    for name, opts in sorted(meta["settings"].items()):
        lines.append(f"- `{name}`: `{json.dumps(opts, sort_keys=True)}`")
    return "\n".join(lines) + "\n"


# Candidates for `recommended`, benchmarked beside the presets and chosen from by the summary
# (most attacks meeting the goal, then the smallest mean ACC drop); never per attack.
CANDIDATES = {
    "cand-asam-rho1": ("ft-sam", {"sam_rho": 1.0}),
    "cand-fst-alpha0.05": ("fst", {"feature_shift_weight": 0.05}),
    # FST at the papers' 100-epoch schedule; under the smoke profile it needs
    # --set purify.overrides.cand-fst-paper.epochs=100 purify.overrides.cand-fst-paper.lr_step=40
    "cand-fst-paper": ("fst", {}),
    # Third pass (variants of fst-kd, 100 epochs like recommended; under the smoke profile each needs
    # --set purify.overrides.NAME.epochs=100 purify.overrides.NAME.lr_step=40):
    "cand-kd-mix1": ("fst-kd", {"distill_mixup": 1.0}),           # KD on mixup views
    "cand-kd-mix1-a2": ("fst-kd", {"distill_mixup": 1.0, "feature_shift_weight": 2.0}),
    "cand-kd-a2": ("fst-kd", {"feature_shift_weight": 2.0}),      # a stronger shift
    "cand-a2-t1": ("fst-kd", {"feature_shift_weight": 2.0, "distill_temperature": 1.0}),
    "cand-a2-kd2": ("fst-kd", {"feature_shift_weight": 2.0, "distill_weight": 2.0}),   # CE's share halved
    "cand-a4-kd4": ("fst-kd", {"feature_shift_weight": 4.0, "distill_weight": 4.0}),
    # Fourth pass (overlay consistency, objective.py; 100 epochs as above). The full row of alpha 2,
    # beta 2, overlay 0.3 is the preset `fst-kd-overlay` (one thread per run, 2026-11-28):
    "cand-ov3": ("fst-kd", {"overlay_max": 0.3}),
    "cand-ov3-a05": ("fst-kd", {"overlay_max": 0.3, "feature_shift_weight": 0.5}),
    "cand-ov3-kd2": ("fst-kd", {"overlay_max": 0.3, "distill_weight": 2.0}),
    "cand-ov2-kd2": ("fst-kd", {"overlay_max": 0.2, "distill_weight": 2.0}),
    "cand-ov3-kd2-a0": ("fst-kd", {"overlay_max": 0.3, "distill_weight": 2.0, "feature_shift_weight": 0.0}),
    "cand-ov3-kd2-a02": ("fst-kd", {"overlay_max": 0.3, "distill_weight": 2.0, "feature_shift_weight": 0.2}),
    # Fifth pass: alpha 2, beta 3, overlay 0.15 (its row is `recommended` = fst-kd-overlay-light since then;
    # the earlier `recommended` row is the column fst-kd)
    "cand-ov15-a2-kd3": ("fst-kd", {"overlay_max": 0.15, "distill_weight": 3.0, "feature_shift_weight": 2.0}),
    # Seventh pass: the preset's batch (128 before; 100 epochs as above). Since this pass the image
    # modality's `recommended` runs in batches of 32, so cand-b32 is `recommended` on images and the
    # batch-128 row is the preset (`fst-kd-overlay-light`).
    "cand-b32": ("recommended", {"batch_size": 32}),
    "cand-b64": ("recommended", {"batch_size": 64}),
    # Eighth pass: a stronger shift at batch 32 (100 epochs as above; rules in
    # results/purification_matrix_pass8_rules.md).
    "cand-b32-a25": ("recommended", {"batch_size": 32, "feature_shift_weight": 2.5}),
    "cand-b32-a3": ("recommended", {"batch_size": 32, "feature_shift_weight": 3.0}),
}


def _candidates() -> dict:
    """CANDIDATES plus any given as JSON in $SMOOTHPURIFY_CANDIDATES ({name: [base, settings]})."""
    extra = json.loads(os.environ.get("SMOOTHPURIFY_CANDIDATES", "{}"))
    return {**CANDIDATES, **{k: tuple(v) for k, v in extra.items()}}


def run_row(args, attack: str) -> None:
    import torch

    from modalities.image import ImageModality
    from smoothpurify import SmoothPurifyError
    import pipeline
    from smoothpurify.methods import PRESETS
    from modalities.contract import register_modality
    from pipeline.params import deep_merge

    register_modality("image", ImageModality)  # also where the package is not installed (a GPU box)
    for name, (base, settings) in _candidates().items():
        PRESETS.setdefault(name, {**PRESETS[base], **settings})
    from pipeline.params import load_params

    torch.set_num_threads(args.threads)
    params = deep_merge(load_params(args.params, args.profile), parse_set(args.set))
    params["run_dir"] = args.run_dir
    link_cache(Path(args.run_dir))
    data = pipeline.prepare("image", params)
    t0 = time.perf_counter()
    code = code_state()  # what this process imported; a tree edited later does not change it
    pipeline.train_attack("image", params, attack, progress=False)
    print(f"{attack}: model ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    json_path = Path(args.out).with_suffix(".json")
    for method in args.methods:
        try:
            rec = pipeline.purify("image", params, attack, method, progress=False)
        except SmoothPurifyError as err:  # one method's failure must not cost the row its other methods
            print(f"  {method:12s} FAILED: {err}", flush=True)
            continue
        store = json.loads(json_path.read_text()) if json_path.is_file() else {"rows": {}, "meta": {"settings": {}}}
        img = params["image"]
        store["meta"] = {"profile": params["profile"], "data": data["source"].split(" (")[0], "model": img["model"],
                         "train": f"{img['train']['epochs']} epochs" + (" with augmentation" if img["train"].get("augment")
                                                                       else ""),
                         "val_size": data["sizes"]["val"], "test_size": data["sizes"]["test"], "seed": params["seed"],
                         "device": args.device_label, "settings": {**store["meta"].get("settings", {}),
                                                                   method: pipeline.method_runner(params, method)[0]}}
        row = store["rows"].setdefault(attack, {})
        row["none"] = {k: rec["before"][k] for k in ("asr", "acc", "ra")}
        row[method] = {**{k: rec["after"][k] for k in ("asr", "acc", "ra")}, "seconds": rec["seconds"],
                       "diverged": bool(rec.get("diverged")), "code": code}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(store, indent=2, sort_keys=True) + "\n")
        json_path.with_suffix(".md").write_text(to_markdown(store))
        print(f"  {method:12s} ASR {rec['before']['asr']:.3f} -> {rec['after']['asr']:.3f}  ACC {rec['before']['acc']:.3f}"
              f" -> {rec['after']['acc']:.3f}{'  DIVERGED' if rec.get('diverged') else ''}  "
              f"{rec['seconds']['total']:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="*", default=ATTACKS)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", default=None)
    ap.add_argument("--run-dir", default=str(ROOT / "runs-bench-matrix"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device-label", default="CPU (2 cores)")
    ap.add_argument("--out", default=str(RESULTS / "purification_matrix"))
    ap.add_argument("--set", nargs="*", action="extend", default=[], help="params overrides, e.g. image.train.epochs=20")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one attack in this process
    args = ap.parse_args(argv)
    if args.row:
        run_row(args, args.row)
        return
    common = ["--methods", *args.methods, "--params", args.params, "--run-dir", args.run_dir, "--threads",
              str(args.threads), "--device-label", args.device_label, "--out", args.out]
    common += ["--profile", args.profile] if args.profile else []
    common += ["--set", *args.set] if args.set else []
    for attack in args.attacks:
        if subprocess.call([sys.executable, __file__, *common, "--row", attack]) != 0:
            print(f"{attack}: row failed (see above); continuing", flush=True)


if __name__ == "__main__":
    main()
