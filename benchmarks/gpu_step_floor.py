"""Where a purification step's time goes on a GPU: eager vs CUDA-graph replay, fp32 vs bf16.

    python benchmarks/gpu_step_floor.py --out OUT.json [--steps 200]

One step of PreActResNet-18 (batch 128 of 1x28x28, the paper profile's purification on Fashion-MNIST):
ft (SGD), ft-sam (ASAM, two forward/backward passes) and f-SFT's non-trace step (spectral shifts,
NLL + Fisher-weighted anchor), each timed eagerly and replayed from one captured CUDA graph (the
launch-free floor: the same kernels without the host issuing them one by one). Then one ft step at
a compute-bound size (batch 128 of 3x96x96) in float32 and under bfloat16 autocast, to show where
autocast pays. Random data: only the time is measured. Prints and writes a JSON table; ratios are
measured in one run, the device is recorded.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))


def _make(method: str, channels: int, side: int, device: str):
    import torch

    from modalities.image.models import create_model
    from smoothpurify.likelihood import Categorical
    from smoothpurify.objective import Objective
    from smoothpurify.optim import make_optimizer
    from smoothpurify.parametrize import prepare

    torch.manual_seed(0)
    model = create_model("preact_resnet18", 10, channels, side).to(device)
    tuned = prepare(model, "spectral" if method == "fsft" else "full")
    tuned.model.to(memory_format=torch.channels_last)
    tuned.train()
    params = tuned.named_tuned()
    objective = Objective(Categorical(), anchor_weight=5.0 if method == "fsft" else 0.0)
    if method == "fsft":
        objective.fisher_diag = {n: torch.rand_like(p) for n, p in params.items()}
        objective.anchor = {n: p.detach().clone() for n, p in params.items()}
    if method == "ft-sam":
        opt = make_optimizer("sam", list(params.values()), lr=0.01, momentum=0.9, weight_decay=5e-4, rho=2.0,
                             adaptive=True)
    else:
        opt = make_optimizer("sgd", list(params.values()), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(128, channels, side, side, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.arange(128, device=device) % 10

    def step():
        def closure():
            opt.zero_grad(set_to_none=True)
            loss, _ = objective(tuned.model, params, x, y, 1)
            loss.backward()
            return loss
        return opt.step(closure)
    return step


def _time(fn, steps: int, sync) -> float:
    for _ in range(min(5, steps)):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--big-steps", type=int, default=20, help="steps of the compute-bound comparison")
    ap.add_argument("--device-label", default="CPU")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = {}
    for method in ("ft", "ft-sam", "fsft"):
        step = _make(method, 1, 28, device)
        row = {"eager_ms": _time(step, args.steps, sync)}
        if cuda:
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        step()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                row["graph_ms"] = _time(graph.replay, args.steps, sync)
            except Exception as err:  # the table says why a cell is missing
                row["graph_error"] = f"{type(err).__name__}: {err}"[:300]
        rows[method] = row
        print(method, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    big = _make("ft", 3, 96, device)
    rows["ft 3x96x96"] = {"fp32_ms": _time(big, args.big_steps, sync)}
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        rows["ft 3x96x96"]["bf16_ms"] = _time(big, args.big_steps, sync)
    print("ft 3x96x96", rows["ft 3x96x96"], flush=True)
    out = {"device": args.device_label, "torch": torch.__version__, "steps": args.steps, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
