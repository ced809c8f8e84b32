#!/usr/bin/env bash
# The fast GPU path, timed on one GPU: a step's floor (benchmarks/gpu_step_floor.py: eager vs CUDA
# graph, fp32 vs bf16), then the paper profile's model (PreActResNet-18, 600 clean samples, 100 epochs)
# purified by every core method (benchmarks/gpu_fast_path.py) in this tree's modes (MODES, default
# auto; e.g. MODES="fp32 bf16" COMPILE=ft PROFILE_METHODS="fsft ft-sam") and, in a second process,
# with the package as it was before the speed-ups (runs-gpu/before/smoothpurify: `git archive b980bbe smoothpurify |
# tar -x -C runs-gpu/before`); one merged table, every number with the device named.
#   bash benchmarks/gpu_fast_path.sh OUT_DIR [extra --set overrides...]
# Needs runs/image/cache (the extracted Debian dataset) and, where pydantic is missing, runs-gpu/wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_fast_path.sh OUT_DIR}; shift
source benchmarks/gpu_env.sh
mkdir -p "$out"
common=(--profile paper --run-dir /tmp/runs-gpu --threads 8 --device-label "$device"
        --set image.dataset=fashion_mnist image.data_path=null image.train.epochs="${TRAIN_EPOCHS:-8}"
        image.device=cuda purify.curve_every=0 "$@")
if [ -z "${SKIP_FLOOR:-}" ]; then
    python benchmarks/gpu_step_floor.py --out "$out/step_floor.json" --device-label "$device" 2>&1 | tee "$out/step_floor.log"
fi
python benchmarks/gpu_fast_path.py --modes ${MODES:-auto} ${COMPILE:+--compile $COMPILE} --budget "${COMPILE_BUDGET:-150}" \
    ${PROFILE_METHODS:+--profile-methods $PROFILE_METHODS} --out "$out/after.json" "${common[@]}" 2>&1 | tee "$out/after.log"
files=("$out/after.json")
if [ -d runs-gpu/before/smoothpurify ]; then
    PYTHONPATH="$PWD/runs-gpu/before:${PYTHONPATH:-}" python benchmarks/gpu_fast_path.py --modes before \
        --out "$out/before.json" "${common[@]}" 2>&1 | tee "$out/before.log"
    files=("$out/before.json" "${files[@]}")
fi
python benchmarks/gpu_fast_path.py --merge "${files[@]}" --out "$out/fast_path"
