"""Benchmark: every baseline defense against badnets / blend / trojan on the smoke profile.

    .venv/bin/python benchmarks/defenses_table.py
    .venv/bin/python benchmarks/defenses_table.py --attacks badnets --defenses fp clp --set anp.iterations=300

Loads params.yaml (smoke profile), sends runs to ``--run-dir`` (default ``runs-bench-defenses``,
so the demo's ``runs/`` is untouched), prepares the data, trains each backdoored model through the
real pipeline and purifies it with each defense through ``pipeline.purify`` (the same code path as
the DVC stage). Defense options: params.yaml's ``purify.overrides.<name>`` if present, else
nothing (paper scale), then ``--set``. Writes one row per
(attack, defense) — ASR, ACC, RA after, the backdoored model's numbers as the "none" row, wall
seconds split as setup + tuning — to ``benchmarks/results/defenses.{json,md}`` (merged with
earlier rows, so a subset can be re-run).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_common import link_cache, parse_set  # noqa: E402

ATTACKS = ["badnets", "blend", "trojan"]
DEFENSES = ["fp", "nad", "anp", "ibau", "awm", "mcr", "clp"]
RESULTS = ROOT / "benchmarks" / "results"


def to_markdown(store: dict) -> str:
    meta, rows = store["meta"], store["rows"]
    lines = [f"# Baseline defenses ({meta['profile']} profile, {meta['data']})", "",
             f"Model `{meta['model']}`, clean validation set of {meta['val_size']} samples (the defender's only "
             f"data), test set of {meta['test_size']}, seed {meta['seed']}, {meta['threads']} CPU thread(s). "
             "Seconds are wall time of the defense (setup + tuning), excluding evaluation.", "",
             "| attack | defense | ASR | ACC | RA | seconds (setup + tuning) |", "|---|---|---|---|---|---|"]
    for attack in [a for a in ATTACKS if a in rows] + sorted(set(rows) - set(ATTACKS)):
        for name in ["none"] + [d for d in DEFENSES if d in rows[attack]]:
            r = rows[attack].get(name)
            if r is None:
                continue
            secs = "-" if name == "none" else f"{r['seconds']['total']:.1f} ({r['seconds']['setup']:.1f} + " \
                                                f"{r['seconds']['tuning']:.1f})"
            lines.append(f"| {attack} | {name} | {r['asr']:.1%} | {r['acc']:.1%} | {r['ra']:.1%} | {secs} |")
    lines += ["", "none: the backdoored model before any defense. ASR: poisoned test inputs (true class != "
              "target) classified as the target; RA: the same inputs classified as their true class.", "",
              "Options per defense:", ""]
    for name, opts in sorted(meta["options"].items()):
        lines.append(f"- `{name}`: `{json.dumps(opts, sort_keys=True)}`")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="*", default=ATTACKS)
    ap.add_argument("--defenses", nargs="*", default=DEFENSES)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs-bench-defenses"))
    ap.add_argument("--set", nargs="*", default=[], help="defense options, e.g. anp.iterations=300")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "defenses"))
    args = ap.parse_args(argv)

    import torch

    import pipeline
    from pipeline.params import load_params

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    params["run_dir"] = args.run_dir
    params["image"]["attacks"] = list(args.attacks)
    overrides = params.setdefault("purify", {}).setdefault("overrides", {}) or {}
    params["purify"]["overrides"] = overrides
    extra = parse_set(args.set)
    for name in args.defenses:
        base = overrides.get(name) or {}
        overrides[name] = {**base, **extra.get(name, {})}
    link_cache(Path(args.run_dir))
    data = pipeline.prepare("image", params)

    out = Path(args.out)
    json_path = out.with_suffix(".json")
    store = json.loads(json_path.read_text()) if json_path.is_file() else {"rows": {}, "meta": {"options": {}}}
    store["meta"] = {"profile": params["profile"], "data": data["source"].split(" (")[0],
                     "model": params["image"]["model"], "val_size": data["sizes"]["val"],
                     "test_size": data["sizes"]["test"], "seed": params["seed"], "threads": args.threads,
                     "options": {**store["meta"].get("options", {}),
                                 **{d: overrides[d] for d in args.defenses}}}
    for attack in args.attacks:
        t0 = time.perf_counter()
        pipeline.train_attack("image", params, attack, progress=False)
        print(f"{attack}: model ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows = store["rows"].setdefault(attack, {})
        for name in args.defenses:
            rec = pipeline.purify("image", params, attack, name, progress=False)
            rows["none"] = {k: rec["before"][k] for k in ("asr", "acc", "ra")}
            rows[name] = {**{k: rec["after"][k] for k in ("asr", "acc", "ra")}, "seconds": rec["seconds"]}
            print(f"  {name:5s} ASR {rec['before']['asr']:.3f} -> {rec['after']['asr']:.3f}  "
                  f"ACC {rec['before']['acc']:.3f} -> {rec['after']['acc']:.3f}  {rec['seconds']['total']:.1f} s",
                  flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(store, indent=2, sort_keys=True) + "\n")
            out.with_suffix(".md").write_text(to_markdown(store))


if __name__ == "__main__":
    main()
