"""Benchmark: the backdoor scan with and without a clean reference (smoothpurify.scan_reference).

    .venv/bin/python benchmarks/scan_reference.py scan seed0/badnets runs-bench-matrix/image/models/badnets runs-bench-matrix
    .venv/bin/python benchmarks/scan_reference.py scan ref-seed0 runs/image/models/benign runs --reference
    .venv/bin/python benchmarks/scan_reference.py table

``scan NAME MODEL_DIR DATA_RUN`` scans one model (mask, additive, margin; seed 0; one thread) on the
clean validation split of the run directory ``DATA_RUN`` and appends each family's sizes to
``benchmarks/results/scan_reference.jsonl``; with ``--reference`` it first replaces the model by its
clean reference (the architecture re-initialised and trained on that split, as ``--reference`` does)
and records the reference's accuracy. Models are named ``<split>/<model>`` and references
``ref-<split>``; ``table`` judges every model three ways (each family at 2.43, the raw Stouffer sum, the
Stouffer sum against its split's reference, both at the 5 % null threshold) and writes
``scan_reference.md``. Train the models first (``purification_matrix.py`` or the pipeline with another
``seed`` and ``run_dir``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
FAMILIES = ("mask", "additive", "margin")


def scan_one(args) -> None:
    import torch

    from modalities.contract import register_modality
    from modalities.image import ImageModality
    from pipeline.params import load_params
    from pipeline.run import Run
    from smoothpurify.max_margin import MaxMargin
    from smoothpurify.scan import Additive, MaskPattern, ScanSettings, scan_families
    from smoothpurify.scan_reference import ReferenceTraining, train_reference
    from smoothpurify.training import predict

    register_modality("image", ImageModality)
    torch.set_num_threads(1)
    params = {**load_params(str(ROOT / "params.yaml"), "smoke"), "run_dir": args.data_run}
    run = Run("image", params)
    mod = run.modality
    x, y = mod.load_split(run.data_dir, "val")
    model = mod.load_model(Path(args.model_dir))[0]
    info = {}
    if args.reference:
        t0 = time.perf_counter()
        model = train_reference(model, x, y, mod.likelihood, augment=mod.augment, progress=False,
                                settings=ReferenceTraining(seed=args.ref_seed))
        xt, yt = mod.load_split(run.data_dir, "test")
        info = {"ref_train_s": round(time.perf_counter() - t0, 1),
                "ref_val_acc": float((predict(model, x) == y).float().mean()),
                "ref_test_acc": float((predict(model, xt) == yt).float().mean())}
    families = {"mask": MaskPattern, "additive": Additive, "margin": MaxMargin}
    for fam in FAMILIES:
        t0 = time.perf_counter()
        r = scan_families(model, x, y, 10, {fam: families[fam]()}, ScanSettings(steps=120), seed=0,
                          progress=False).results[fam]
        rec = {"name": args.name, "family": fam, "sizes": [t.size for t in r.triggers],
               "seconds": round(time.perf_counter() - t0, 1), **info}
        with open(RESULTS / "scan_reference.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(args.name, fam, f"{time.perf_counter() - t0:.0f} s", flush=True)


def recorded_sizes() -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    """The records: ``{model: {family: sizes}}`` and each reference's test accuracy."""
    sizes: dict[str, dict[str, list[float]]] = {}
    acc: dict[str, float] = {}
    for line in (RESULTS / "scan_reference.jsonl").read_text().splitlines():
        r = json.loads(line)
        sizes.setdefault(r["name"], {})[r["family"]] = [math.inf if s is None else s for s in r["sizes"]]
        if "ref_test_acc" in r:
            acc[r["name"]] = r["ref_test_acc"]
    return sizes, acc


def recorded_scan(fams: dict[str, list[float]], threshold: float):
    """Recorded per-family sizes as the :class:`CombinedScan` they came from."""
    from smoothpurify.scan import ClassTrigger, CombinedScan, ScanResult

    return CombinedScan({f: ScanResult.judged([ClassTrigger(t, s, 1.0) for t, s in enumerate(v)], threshold, 0.0)
                         for f, v in fams.items()})


def table() -> str:
    from smoothpurify.scan import CombinedScan, family_threshold
    from smoothpurify.scan_reference import ReferencedScan, null_threshold

    sizes, acc = recorded_sizes()
    per_family, z = family_threshold(2.0, 3), null_threshold(10, 3)

    def scanned(name: str) -> CombinedScan | None:  # the recorded sizes as the scan they came from
        fams = sizes.get(name)
        if not fams or set(fams) != set(FAMILIES):
            return None
        return recorded_scan({f: fams[f] for f in FAMILIES}, per_family)

    def top(v: list[float]) -> str:
        i = max(range(len(v)), key=v.__getitem__)
        return f"{v[i]:.2f} ({i})"

    def flag(v: list[float], thr: float) -> str:
        return f"**{top(v)}**" if max(v) > thr else top(v)

    def stouffer(scan: CombinedScan) -> list[float]:
        return [sum(r.anomaly[t] for r in scan.results.values()) / math.sqrt(len(FAMILIES)) for t in range(10)]

    lines = ["# The scan with and without a clean reference (smoke profile, CPU, one thread per scan)", "",
             f"Largest value (class). Old rule: any family's anomaly index over {per_family:.2f}. Stouffer: "
             f"sum of the three families' anomaly indices per class / sqrt(3), flagged over {z:.2f} (flags 5 % "
             "of clean models under the normal null). Relative: each family's index of log size - the "
             "reference's log size. Every attack's target is class 0.", "",
             "| model | mask | additive | margin | old rule | Stouffer | relative mask | relative additive | "
             "relative margin | **relative Stouffer** |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(n for n in sizes if not n.startswith("ref-")):
        own, ref = scanned(name), scanned("ref-" + name.split("/")[0])
        if own is None or ref is None:
            continue
        judged = ReferencedScan(own, ref)
        raw = {f: own.results[f].anomaly for f in FAMILIES}
        old = max(FAMILIES, key=lambda f: max(raw[f]))
        lines.append(f"| {name} | " + " | ".join(top(raw[f]) for f in FAMILIES) +
                     f" | {'**flag ' + top(raw[old]) + '**' if own.flagged else 'no'} | {flag(stouffer(own), z)} | "
                     + " | ".join(top(judged.results[f].anomaly) for f in FAMILIES) + f" | {flag(judged.combined, z)} |")
    lines += ["", "The received model judged against its purified model (`purify --scan`'s \"what the purification "
              f"removed\"; `recommended`): Stouffer sum of the families' indices of log size(received) - log "
              f"size(purified), flagged over {z:.2f}.", "", "| model | mask | additive | margin | **Stouffer** |",
              "|---|---|---|---|---|"]
    for name in sorted(sizes):
        received, after = scanned(name), scanned(f"{name} after recommended")
        if received is None or after is None:
            continue
        judged = ReferencedScan(received, after)
        lines.append(f"| {name} | " + " | ".join(top(judged.results[f].anomaly) for f in FAMILIES) +
                     f" | {flag(judged.combined, z)} |")
    lines += ["", "References (test accuracy): " + ", ".join(f"{k} {v:.1%}" for k, v in sorted(acc.items()))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scan")
    s.add_argument("name")
    s.add_argument("model_dir")
    s.add_argument("data_run")
    s.add_argument("--reference", action="store_true")
    s.add_argument("--ref-seed", type=int, default=0, help="the reference's initialisation and batch order")
    sub.add_parser("table")
    args = ap.parse_args(argv)
    if args.cmd == "scan":
        scan_one(args)
    else:
        (RESULTS / "scan_reference.md").write_text(table())
        print(table())


if __name__ == "__main__":
    main()
