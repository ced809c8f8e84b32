"""Benchmark: the backdoor scan on the benign, every backdoored and every purified model of the matrix.

    .venv/bin/python benchmarks/scan_matrix.py                                  # default models and families
    .venv/bin/python benchmarks/scan_matrix.py --attacks sig wanet --families mask additive --methods recommended

Scans (clean validation data only) the models the purification matrix left in ``--run-dir`` (default
``runs-bench-matrix``; run ``purification_matrix.py`` first) and the benign model of ``--benign-dir``
(the demo's ``runs``), and puts each scan's largest anomaly and suspected class beside the model's
measured test ASR, which the scan never sees. Writes ``benchmarks/results/scan_matrix.{json,md}``
after every scan (merged with earlier ones), so a long run keeps what it finished.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ATTACKS = ["badnets", "blend", "trojan", "sig", "wanet", "dynamic"]
RESULTS = ROOT / "benchmarks" / "results"


def to_markdown(store: dict) -> str:
    meta = store["meta"]
    lines = ["# Backdoor scan on the matrix's models (smoke profile)", "",
             f"Neural Cleanse-style scan, {meta['steps']} steps per class, {meta['val_size']} clean validation "
             f"samples, flag at anomaly > {meta['threshold']:g}, {meta['device']}; the margin family (MM-BD): 600 Adam steps "
             "(lr 0.1) from 16 random inputs per class, no clean input used. Test ASR is measured on poisoned "
             "test data the scan never sees; target class 0 for every attack.", "",
             "| model | family | test ASR | largest anomaly (class) | anomaly of class 0 | flagged | seconds |",
             "|---|---|---|---|---|---|---|"]
    for key in sorted(store["scans"]):
        s = store["scans"][key]
        top = max(range(len(s["anomaly"])), key=s["anomaly"].__getitem__)
        asr = "-" if s["asr"] is None else f"{s['asr']:.1%}"
        flag = f"**yes, class {s['suspected']}**" if s["flagged"] else "no"
        lines.append(f"| {s['model']} | {s['family']} | {asr} | {s['max_anomaly']:.2f} ({top}) | "
                     f"{s['anomaly'][0]:.2f} | {flag} | {s['seconds']:.0f} |")
    from smoothpurify.scan import family_threshold

    models: dict[str, dict] = {}
    for s in store["scans"].values():
        models.setdefault(s["model"], {})[s["family"]] = s
    for combo in (("mask", "additive", "margin"), ("mask", "additive")):
        z = family_threshold(meta["threshold"], len(combo))
        lines += ["", f"{' + '.join(combo)} together (what `smoothpurify scan` does on images"
                  f"{' before the margin family' if len(combo) == 2 else ''}): each family flags at {z:.2f} (the "
                  f"threshold {meta['threshold']:g} corrected for {len(combo)} families, "
                  "`smoothpurify.scan.family_threshold`), the model when any does; the suspect is the flagging "
                  "family's most anomalous class.", "",
                  f"| model | test ASR | {' | '.join(combo)} | flagged | suspected |",
                  "|---|---|" + "---|" * len(combo) + "---|---|"]
        for name in sorted(models):
            fams = models[name]
            if not set(combo) <= set(fams):
                continue
            flagged = [fams[f] for f in combo if fams[f]["max_anomaly"] > z]
            top = max(flagged, key=lambda f: f["max_anomaly"]) if flagged else None
            asr = next(iter(fams.values()))["asr"]
            cells = " | ".join(f"{fams[f]['max_anomaly']:.2f} ({fams[f]['anomaly'].index(fams[f]['max_anomaly'])})"
                               for f in combo)
            lines.append(f"| {name} | {'-' if asr is None else f'{asr:.1%}'} | {cells} | {'**yes**' if top else 'no'} | "
                         f"{top['anomaly'].index(top['max_anomaly']) if top else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="*", default=ATTACKS)
    ap.add_argument("--methods", nargs="*", default=["recommended"], help="purified models to scan too")
    ap.add_argument("--families", nargs="*", default=["mask", "additive", "margin"],
                    choices=["mask", "additive", "margin"])
    ap.add_argument("--no-benign", action="store_true")
    ap.add_argument("--extra-benign", nargs="*", default=[], metavar="NAME=RUN_DIR",
                    help="more benign models (another seed's run directory; scanned on its own validation split)")
    ap.add_argument("--no-backdoored", action="store_true")
    ap.add_argument("--no-purified", action="store_true", help="--methods only give the ASR before purification")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0, help="the scan's seed (batches, random starts); records of "
                                                        "another seed than 0 are keyed '<model> (scan seed N)'")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs-bench-matrix"))
    ap.add_argument("--benign-dir", default=str(ROOT / "runs"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device-label", default="CPU (2 cores)")
    ap.add_argument("--out", default=str(RESULTS / "scan_matrix"))
    args = ap.parse_args(argv)

    import torch

    from modalities.contract import register_modality
    from modalities.image import ImageModality
    from pipeline.params import load_params
    from pipeline.run import Run
    from smoothpurify.max_margin import MaxMargin
    from smoothpurify.scan import FLAG_THRESHOLD, Additive, MaskPattern, ScanSettings, scan_families

    register_modality("image", ImageModality)
    torch.set_num_threads(args.threads)
    params = load_params(args.params, "smoke")
    run = Run("image", {**params, "run_dir": args.run_dir})
    benign_run = Run("image", {**params, "run_dir": args.benign_dir})
    mod = run.modality
    x, y = mod.load_split(run.data_dir, "val")
    num_classes = int(y.max()) + 1

    jobs: list[tuple[str, Path, float | None]] = []
    data_of: dict[str, Path] = {}
    if not args.no_benign:
        jobs.append(("benign", benign_run.model_dir("benign"), None))
    for item in args.extra_benign:
        name, _, run_dir = item.partition("=")
        extra = Run("image", {**params, "run_dir": run_dir})
        jobs.append((name, extra.model_dir("benign"), None))
        data_of[name] = extra.data_dir
    for attack in args.attacks:
        records = {m: json.loads(run.purify_metrics(attack, m).read_text()) for m in args.methods}
        if not args.no_backdoored:  # the ASR before purification, as the purify records measured it
            before = next(iter(records.values()))["before"]["asr"] if records else None
            jobs.append((attack, run.model_dir(attack), before))
        for method, rec in ([] if args.no_purified else records.items()):
            jobs.append((f"{attack} after {method}", run.purified_dir(attack, method), rec["after"]["asr"]))

    out = Path(args.out)
    store = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {"scans": {}}
    store["meta"] = {"steps": args.steps, "val_size": len(y), "threshold": FLAG_THRESHOLD, "device": args.device_label}
    families = {"mask": MaskPattern, "additive": Additive, "margin": MaxMargin}
    for name, model_dir, asr in jobs:
        model = mod.load_model(model_dir)[0]
        xs, ys = mod.load_split(data_of[name], "val") if name in data_of else (x, y)
        for fam in args.families:
            t0 = time.perf_counter()
            # one family at a time, at the single-family threshold; the combined table corrects for three
            result = scan_families(model, xs, ys, num_classes, {fam: families[fam]()}, ScanSettings(steps=args.steps),
                                   seed=args.seed, progress=False).results[fam]
            label = name if args.seed == 0 else f"{name} (scan seed {args.seed})"
            store["scans"][f"{label} | {fam}"] = {"model": label, "family": fam, "asr": asr, **result.to_record()}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(json.dumps(store, indent=2, sort_keys=True) + "\n")
            out.with_suffix(".md").write_text(to_markdown(store))
            print(f"{name:28s} {fam:8s} max anomaly {result.max_anomaly:5.2f}  suspected {result.suspected}  "
                  f"class 0 {result.anomaly[0]:5.2f}  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
