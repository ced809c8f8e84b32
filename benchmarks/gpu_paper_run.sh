#!/usr/bin/env bash
# The paper profile's model (PreActResNet-18) on the embedded Fashion-MNIST, on one GPU:
# badnets and blend x every method, one process per attack (benchmarks/purification_matrix.py).
#   bash benchmarks/gpu_paper_run.sh OUT_DIR [extra --set overrides...]
# Needs runs/image/cache (the extracted Debian dataset) and, where pydantic is missing, its wheels in
# runs-gpu/wheels (pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
# -d runs-gpu/wheels pydantic). Prints the device; every number it writes says which.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_paper_run.sh OUT_DIR}; shift
source benchmarks/gpu_env.sh
python benchmarks/purification_matrix.py --profile paper --attacks badnets blend \
    --methods ${METHODS:-recommended fst ft-init ft ft-sam ft-sam-sft sft fsft ngf sft-authors} \
    --run-dir /tmp/runs-gpu --threads 8 --device-label "$device" --out "$out/purification_matrix_paper" \
    --set image.dataset=fashion_mnist image.data_path=null image.train.epochs=20 purify.curve_every=0 "$@"
