"""Operators dispatched per tuning step, per method: a CPU-measurable proxy of a GPU step's host cost.

    python benchmarks/step_ops.py [--model preact_resnet18] [--out benchmarks/results/step_ops]

On a GPU, the paper profile's steps are bound by the host issuing kernels (README, "The fast GPU
path"), so a step's time follows the number of operators it dispatches: counted here with a
``TorchDispatchMode`` around ``optimizer.step(closure)`` (backward included) on random data, batch 128
of 1x28x28, the GPU path's settings (channels_last, deferred checks) forced on the CPU. f-SFT is
counted on a plain step and on a trace step (every ``trace_every``-th step); its per-epoch mean is
``((k - 1) plain + trace) / k``. View operators (no kernel) are counted apart.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))

VIEWS = {"view", "reshape", "_reshape_alias", "as_strided", "transpose", "permute", "t", "expand", "unsqueeze",
         "squeeze", "detach", "alias", "_unsafe_view", "slice", "select", "split", "split_with_sizes", "unbind",
         "lift_fresh", "resolve_conj", "resolve_neg"}


def count_steps(model_name: str, method: str, steps: int = 3) -> dict[int, collections.Counter]:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import smoothpurify.purify as purify_module
    from modalities.image.models import create_model
    from smoothpurify.accel import Accel
    from smoothpurify.likelihood import Categorical
    from smoothpurify.methods import method_config

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    counts: dict[int, collections.Counter] = {}
    real_make = purify_module._make_optimizer

    def make_counting_optimizer(cfg, params):
        opt = real_make(cfg, params)
        real_step = opt.step

        def step(self, closure=None):  # the whole step: both SAM passes, backward, the update
            mode = Count()
            with mode:
                out = real_step(closure)
            counts[closure.step] = mode.ops
            return out
        opt.step = types.MethodType(step, opt)  # bound, as lr schedulers expect
        return opt

    purify_module._make_optimizer = make_counting_optimizer
    purify_module.resolve_accel = lambda *a, **k: Accel(channels_last=True, defer_checks=True)
    try:
        torch.manual_seed(0)
        model = create_model(model_name, 10, 1, 28)
        x, y = torch.rand(128 * steps, 1, 28, 28), torch.arange(128 * steps) % 10
        cfg = method_config(method, {"epochs": 1, "batch_size": 128, "augment": False})
        purify_module.purify(model, x, y, Categorical(), cfg, progress=False)
    finally:
        purify_module._make_optimizer = real_make
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preact_resnet18")
    ap.add_argument("--methods", nargs="+", default=["ft", "ft-sam", "sft", "fsft", "ngf", "recommended"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_ops"))
    args = ap.parse_args(argv)
    from smoothpurify.methods import method_config

    rows = {}
    for method in args.methods:
        counts = count_steps(args.model, method)
        cfg = method_config(method)
        every = cfg.trace_every if cfg.trace_weight > 0 else None
        plain, trace = counts[1], counts[0] if every else None
        total = lambda c: sum(c.values())  # noqa: E731
        kernels = lambda c: sum(v for k, v in c.items() if k not in VIEWS)  # noqa: E731
        mean = total(plain) if not every else ((every - 1) * total(plain) + total(trace)) / every
        rows[method] = {"plain_step": total(plain), "plain_step_non_view": kernels(plain),
                        "trace_step": total(trace) if trace else None, "trace_every": every, "mean_per_step": mean}
        print(method, rows[method], flush=True)
    ref = rows.get("ft-sam", {}).get("mean_per_step")
    lines = [f"# Operators dispatched per tuning step — {args.model}, batch 128 of 1x28x28, GPU-path settings",
             "", "Counted on the CPU (`benchmarks/step_ops.py`); a proxy of a host-bound GPU step's cost.", "",
             "| method | plain step | of which not views | trace step | mean per step | / ft-sam |",
             "|---|---|---|---|---|---|"]
    for m, r in rows.items():
        ratio = f"{r['mean_per_step'] / ref:.2f}" if ref else "-"
        lines.append(f"| {m} | {r['plain_step']} | {r['plain_step_non_view']} | {r['trace_step'] or '-'} | "
                     f"{r['mean_per_step']:.0f} | {ratio} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
