#!/usr/bin/env bash
# CUDA graphs in the tuning loop, checked and timed on one GPU (issue 18; README, "The fast GPU path"):
# the GPU tests of tests/test_cuda_graphs.py (graphed runs against eager runs), then the paper profile's
# purification (PreActResNet-18, 600 clean samples, 100 epochs) per mode of benchmarks/gpu_fast_path.py
# (eager: no graphs; runner: the model's forward/backward from graphs; auto: steps captured whole;
# autotune: auto + cudnn.benchmark), f-SFT without its trace term to split its step's cost, and
# torch.profiler tables of where the device time goes. Every number with the device named.
#   bash benchmarks/gpu_graphs.sh OUT_DIR
# Needs runs/image/cache (the extracted Debian dataset) and, where pydantic/pytest are missing, runs-gpu/wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_graphs.sh OUT_DIR}
source benchmarks/gpu_env.sh
mkdir -p "$out"
timeout 150 python -m pytest -q -x -rs -W ignore::UserWarning tests/test_cuda_graphs.py 2>&1 | tee "$out/tests.log" | tail -4
common=(--profile paper --run-dir /tmp/runs-gpu --threads 8 --device-label "$device"
        --set image.dataset=fashion_mnist image.data_path=null image.train.epochs="${TRAIN_EPOCHS:-3}"
        image.device=cuda purify.curve_every=0)
python -W ignore::UserWarning benchmarks/gpu_fast_path.py --modes ${MODES:-eager runner auto autotune} \
    --methods ${METHODS:-ft ft-sam fsft fsft-no-trace} ${PROFILE_METHODS:+--profile-methods $PROFILE_METHODS} \
    --out "$out/core.json" "${common[@]}" 2>&1 | tee "$out/core.log"
files=("$out/core.json")
if [ -n "${REST_METHODS-sft ngf}" ]; then
    python -W ignore::UserWarning benchmarks/gpu_fast_path.py --modes eager auto --methods ${REST_METHODS-sft ngf} \
        --out "$out/rest.json" "${common[@]}" 2>&1 | tee "$out/rest.log"
    files+=("$out/rest.json")
fi
python benchmarks/gpu_fast_path.py --merge "${files[@]}" --out "$out/fast_path"
