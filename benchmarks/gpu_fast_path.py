"""The fast GPU path, timed: every core method's purification of one backdoored model, per speed-up mode.

    python benchmarks/gpu_fast_path.py --modes fp32 auto --compile ft --out OUT.json \
        --profile paper --run-dir /tmp/runs-gpu --set image.device=cuda ...
    python benchmarks/gpu_fast_path.py --merge BEFORE.json AFTER.json --out OUT   # table (OUT.md)

Modes: ``before`` calls ``purify`` without the speed-up options (run it with an older package on
PYTHONPATH to time the code before them), ``ref`` the reference path forced on the device (float32,
a device sync at every step), ``fp32`` / ``auto`` (the default) deferred checks + channels_last +
CUDA graphs, ``eager`` the same without CUDA graphs (``auto`` before them), ``runner`` with the model's
forward and backward from graphs but no step captured whole, ``rebuilt`` ``auto`` with
f-SFT's spectral layers rebuilt once per forward instead of run factored, ``autotune`` ``auto`` with
cuDNN's per-shape algorithm search (``cudnn.benchmark``), ``bf16`` bfloat16 autocast
on top of ``eager``. ``--compile M`` also times method M with ``torch.compile`` (auto).
Each purification runs at the profile's settings (100 epochs), with the modality's augmentation,
after one untimed warm-up; ASR / ACC are measured on the test set for every run, so a speed-up
that changed the result shows. ``--profile-methods`` adds a torch.profiler table (3 epochs) of
where the time goes on the device. Ratios are measured in one run; the device is recorded.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Appended, not prepended: an older package on PYTHONPATH (mode "before") must win over this tree's.
sys.path.append(str(ROOT))

from benchmarks.bench_common import link_cache, parse_set  # noqa: E402

METHODS = ("ft", "ft-sam", "sft", "fsft", "ngf")


def _setup(args):
    import torch

    from benchmarks.purification_cost import load_setup
    from modalities.contract import register_modality
    from modalities.image import ImageModality
    from pipeline.params import deep_merge, load_params

    register_modality("image", ImageModality)  # also where the package is not installed (a GPU box)
    params = deep_merge(load_params(args.params, args.profile), parse_set(args.set))
    params["run_dir"] = args.run_dir
    link_cache(Path(args.run_dir))
    t0 = time.perf_counter()
    mod, model, x, y, evaluate = load_setup(params, args.attack, progress=False)
    print(f"model ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    torch.set_num_threads(args.threads)
    return params, mod, model, x, y, evaluate, params["image"].get("device", "cpu")


def _purify_kwargs(mode: str) -> dict:
    if mode == "before":
        return {}
    import smoothpurify.accel as accel_module
    import smoothpurify.cuda_graphs as graphs_module
    import smoothpurify.parametrize as parametrize_module
    # Module flags, set for every run so that one mode's choice never leaks into the next run.
    accel_module.CUDA_GRAPHS = mode != "eager"
    graphs_module.CAPTURE_WHOLE_STEP = mode != "runner"
    accel_module.CUDNN_BENCHMARK = mode == "autotune"
    parametrize_module.FACTORED = mode != "rebuilt"
    if mode in ("eager", "runner", "rebuilt", "autotune"):
        return {"precision": "auto"}
    if mode == "ref":  # the reference path on the device: what a CPU runs
        import smoothpurify.purify as purify_module
        from smoothpurify.accel import REFERENCE, resolve_accel
        purify_module.resolve_accel = lambda precision, device, **kw: (
            REFERENCE if precision == "ref" else resolve_accel(precision, device, **kw))
        return {"precision": "ref"}
    return {"precision": mode}


def time_modes(args) -> dict:
    import torch

    import pipeline
    from smoothpurify.methods import method_config
    from smoothpurify.purify import purify

    params, mod, model, x, y, evaluate, device = _setup(args)
    import smoothpurify
    out = {"device": args.device_label, "torch": torch.__version__, "package": str(Path(smoothpurify.__file__).parent), "profile": params["profile"],
           "model": params["image"]["model"], "val_size": len(y), "before": evaluate(model), "runs": {}}
    kw_common = dict(seed=params["seed"], device=device, progress=False, augment=mod.augment)
    # Untimed warm-up: CUDA context, cuDNN and cuBLAS handles, the allocator's first blocks.
    purify(model, x, y, mod.likelihood, method_config("ft", {"epochs": 1}), **kw_common, **_purify_kwargs(args.modes[0]))
    t_start = time.perf_counter()
    # "rebuilt" changes spectral layers only: the other methods are not run again.
    jobs = [(mode, m, False) for mode in args.modes for m in args.methods
            if mode != "rebuilt" or method_config(m).parametrization == "spectral"]
    jobs += [("auto", m, True) for m in args.compile]
    for mode, method, compiled in jobs:
        if compiled and time.perf_counter() - t_start > args.budget:
            print(f"skipping {method} compiled: past the {args.budget} s budget", flush=True)
            continue
        cfg = method_config(method, pipeline.method_overrides(params, method))
        kw = {**kw_common, **_purify_kwargs(mode), **({"compile": True} if compiled else {})}
        try:
            t0 = time.perf_counter()
            result = purify(model, x, y, mod.likelihood, cfg, **kw)
            wall = time.perf_counter() - t0
        except Exception as err:  # one failure must not cost the run its other cells
            print(f"{mode:6s} {method:8s} FAILED: {type(err).__name__}: {err}", flush=True)
            continue
        key = f"{mode}{'+compile' if compiled else ''}/{method}"
        rec = result.record
        out["runs"][key] = {**rec["seconds"], "wall": round(wall, 3), "epochs": cfg.epochs, "steps": rec["steps"],
                            **evaluate(result.model), "accel": rec.get("accel"), "diverged": rec["diverged"]}
        r = out["runs"][key]
        print(f"{key:24s} tuning {r['tuning']:7.2f} s  setup {r['setup']:5.2f} s  ASR {100 * r['asr']:5.1f} %  "
              f"ACC {100 * r['acc']:5.1f} %", flush=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    if args.profile_methods:  # METHOD (in the last mode) or MODE/METHOD
        out["profiles"] = {m: _profile(model, x, y, mod, params, m.split("/")[-1], kw_common,
                                       m.split("/")[0] if "/" in m else args.modes[-1])
                           for m in args.profile_methods}
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


def _profile(model, x, y, mod, params, method, kw_common, mode) -> dict:
    """Top operators by device time and by host time over 3 epochs of ``method``."""
    import torch

    import pipeline
    from smoothpurify.methods import method_config
    from smoothpurify.purify import purify

    cfg = method_config(method, {**pipeline.method_overrides(params, method), "epochs": 3})
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=acts) as prof:
        purify(model, x, y, mod.likelihood, cfg, **kw_common, **_purify_kwargs(mode))
    events = prof.key_averages()
    dev = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    top_dev = sorted(events, key=dev, reverse=True)[:12]
    top_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"device_s": [(e.key, round(dev(e) / 1e6, 4), e.count) for e in top_dev],
            "host_s": [(e.key, round(e.self_cpu_time_total / 1e6, 4), e.count) for e in top_cpu],
            "device_total_s": round(sum(dev(e) for e in events) / 1e6, 4)}


def merge(paths: list[str], out: str) -> str:
    """One Markdown table of every run in ``paths`` (JSON files of :func:`time_modes`)."""
    runs, meta, packages = {}, {}, {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        runs.update(data["runs"])
        meta = meta or data
        packages.update({k.split("/")[0]: data.get("package") for k in data["runs"]})
    meta = {**{k: v for k, v in meta.items() if k not in ("runs", "package", "profiles")}, "packages": packages}
    modes = list(dict.fromkeys(k.split("/")[0] for k in runs))
    methods = list(dict.fromkeys(k.split("/")[1] for k in runs))
    base = modes[0]
    b = meta["before"]
    lines = [f"# The fast GPU path — {meta['model']}, profile {meta['profile']}, {meta['val_size']} clean samples",
             "", f"Device: {meta['device']}; torch {meta['torch']}. Backdoored model: ASR {100 * b['asr']:.1f} %, "
             f"ACC {100 * b['acc']:.1f} %. Tuning seconds (setup: SVD, Fisher diagonal, feature cache, excluded), "
             f"ASR / ACC after, in %; speed-up = {base} tuning / mode tuning, all in one run.", "",
             "| method | " + " | ".join(modes) + " | " + " | ".join(f"speed-up {m}" for m in modes[1:]) + " |",
             "|---|" + "---|" * (2 * len(modes) - 1)]
    for method in methods:
        cells, speed = [], []
        ref = runs.get(f"{base}/{method}")
        for mode in modes:
            r = runs.get(f"{mode}/{method}")
            cells.append("-" if r is None else f"{r['tuning']:.2f} s ({100 * r['asr']:.1f} / {100 * r['acc']:.1f})")
            if mode != base:
                speed.append("-" if r is None or ref is None else f"{ref['tuning'] / r['tuning']:.2f}x")
        lines.append(f"| {method} | " + " | ".join(cells) + " | " + " | ".join(speed) + " |")
    lines += ["", "f-SFT per epoch / FT-SAM per epoch (tuning seconds per epoch, same run):", ""]
    for mode in modes:
        f, s = runs.get(f"{mode}/fsft"), runs.get(f"{mode}/ft-sam")
        if f and s:
            lines.append(f"- {mode}: {f['tuning'] / f['epochs'] / (s['tuning'] / s['epochs']):.2f}")
    text = "\n".join(lines) + "\n"
    Path(out).with_suffix(".md").write_text(text)
    Path(out).with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merge", nargs="+", default=None, help="JSON files to merge into one table (OUT.md)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--modes", nargs="+", default=["fp32", "auto"], choices=["before", "ref", "fp32", "eager", "runner", "rebuilt", "auto", "autotune", "bf16"])
    ap.add_argument("--compile", nargs="*", default=[], help="methods also timed with torch.compile (auto)")
    ap.add_argument("--budget", type=float, default=240, help="seconds after which compiled runs are skipped")
    ap.add_argument("--profile-methods", nargs="*", default=[])
    ap.add_argument("--run-dir", default="/tmp/runs-gpu")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--device-label", default="CPU")
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args(argv)
    if args.merge:
        print(merge(args.merge, args.out))
        return 0
    time_modes(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
